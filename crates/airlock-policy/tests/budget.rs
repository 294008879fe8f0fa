//! A policy compiled under a budget (a dry-run's candidate): the regex budget is per policy,
//! and the time budget stops the compiler between rules.

#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

use airlock_policy::{Budget, Refused, compile, compile_within};

fn regex_policy(n: usize, pattern: &str) -> String {
    let mut text = String::from("version: v1\nrules:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - id: r{i}\n    when: {{ topic: t.x, name: {{ regex: '{pattern}{i}' }} }}\n    decision: deny\n"
        ));
    }
    text
}

fn check(text: &str, regex_bytes_max: usize, rules_in_time: usize) -> Result<usize, Refused> {
    let mut asked = 0;
    let mut time_left = || {
        asked += 1;
        asked <= rules_in_time
    };
    compile_within(text, Budget { regex_bytes_max, time_left: &mut time_left }).map(|(p, _)| p.rules().len())
}

#[test]
fn regexes_share_one_budget_per_policy() {
    // Each is far under the per-regex limit; 40 of them are not under 4 MiB together.
    let heavy = regex_policy(40, "\\w{10}\\d{10}");
    match check(&heavy, 4 * 1024 * 1024, usize::MAX) {
        Err(Refused::OverBudget(reason)) => assert!(reason.contains("regexes need more than"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(check(&regex_policy(40, "^db-[a-z]+-"), 4 * 1024 * 1024, usize::MAX).unwrap(), 40);
    assert!(matches!(check(&regex_policy(3, "^db-"), 100, usize::MAX), Err(Refused::OverBudget(_))));
    // `compile` (publish, `policy check`) applies the same default budget, as an error.
    let errors = compile(&heavy).unwrap_err();
    assert!(errors[0].message.contains("regexes need more than"), "{:?}", errors[0]);
}

#[test]
fn the_time_budget_stops_between_rules() {
    match check(&regex_policy(10, "^a"), usize::MAX, 4) {
        Err(Refused::OverBudget(reason)) => assert!(reason.contains("before rule 5 of 10"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(check(&regex_policy(10, "^a"), usize::MAX, 10).unwrap(), 10);
}

#[test]
fn errors_are_still_reported_under_a_budget() {
    match check(
        "version: v1\nrules: [{ id: a, when: { name: { regex: '(' } }, decision: deny }]\n",
        1 << 20,
        9,
    ) {
        Err(Refused::Invalid(errors)) => assert!(errors[0].message.contains("invalid regex"), "{errors:?}"),
        other => panic!("{other:?}"),
    }
}
