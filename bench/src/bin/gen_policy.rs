//! Writes a generated rule set as an Airlock policy file, so that the real CLI's compile time
//! and peak memory can be measured on exactly the policy the benchmark uses:
//! `gen_policy 10000 /tmp/rules-10000.yaml`.

use std::process::ExitCode;

use airlock_bench::ruleset::RuleSet;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [count, path] = args.as_slice() else {
        eprintln!("usage: gen_policy RULES OUT.yaml");
        return ExitCode::from(1);
    };
    let Ok(count) = count.parse::<usize>() else {
        eprintln!("error: `{count}` is not a number of rules");
        return ExitCode::from(1);
    };
    let set = RuleSet::generated(count);
    if let Err(e) = std::fs::write(path, &set.yaml) {
        eprintln!("error: cannot write `{path}`: {e}");
        return ExitCode::from(1);
    }
    println!("wrote {count} rules to {path}");
    ExitCode::SUCCESS
}
