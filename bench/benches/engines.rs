//! Airlock vs Cedar vs Rego on equivalent policies (the seed's 3 rules, 1,000 and 10,000
//! generated rules): the time of one decision from a parsed job and from raw JSON bytes, after
//! checking that all three engines decide every benchmark job identically; and the time to load
//! 10,000 rules. Run with `cargo bench --bench engines`; `report` turns the results into the
//! table of BENCHMARKS.md.

use std::hint::black_box;

use airlock_bench::engines::{self, Airlock, Cedar, Rego};
use airlock_bench::jobs;
use airlock_bench::ruleset::RuleSet;
use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};

/// Policy sizes compared, in rules; 3 is the seed policy.
const SIZES: [usize; 3] = [3, 1_000, 10_000];

fn decisions(c: &mut Criterion) {
    for size in SIZES {
        let set = if size == 3 { RuleSet::seed() } else { RuleSet::generated(size) };
        let jobs = jobs::for_rules(&set);
        let airlock = Airlock::new(&set);
        let cedar = Cedar::new(&set);
        let mut rego = Rego::new(&set);
        engines::check_agreement(&set, &jobs, &airlock, &cedar, &mut rego);
        println!("{}: the three engines agree on {} jobs: {}", set.name, jobs.len(), jobs::mix(&jobs));

        let raw: Vec<&[u8]> = jobs.iter().map(|j| j.raw.as_slice()).collect();
        let parsed: Vec<_> = raw.iter().map(|r| Airlock::parse(r)).collect();
        let requests: Vec<_> = raw.iter().map(|r| cedar.request(r)).collect();
        let inputs: Vec<_> = raw.iter().map(|r| Rego::input(r)).collect();

        // Each iteration decides the next job of the mix, so a median is per decision.
        let mut group = c.benchmark_group(&set.name);
        group.bench_function(BenchmarkId::new("airlock", "parsed"), |b| {
            let mut jobs = parsed.iter().cycle();
            b.iter(|| airlock.decide(black_box(jobs.next().unwrap())));
        });
        group.bench_function(BenchmarkId::new("cedar", "parsed"), |b| {
            let mut requests = requests.iter().cycle();
            b.iter(|| cedar.decide(black_box(requests.next().unwrap())));
        });
        group.bench_function(BenchmarkId::new("rego", "parsed"), |b| {
            let mut inputs = inputs.iter().cycle();
            b.iter(|| rego.decide(black_box(inputs.next().unwrap())));
        });
        group.bench_function(BenchmarkId::new("airlock", "raw-json"), |b| {
            let mut raw = raw.iter().cycle();
            b.iter(|| airlock.decide_raw(black_box(raw.next().unwrap())));
        });
        group.bench_function(BenchmarkId::new("cedar", "raw-json"), |b| {
            let mut raw = raw.iter().cycle();
            b.iter(|| cedar.decide_raw(black_box(raw.next().unwrap())));
        });
        group.bench_function(BenchmarkId::new("rego", "raw-json"), |b| {
            let mut raw = raw.iter().cycle();
            b.iter(|| rego.decide_raw(black_box(raw.next().unwrap())));
        });
        group.finish();
    }
}

/// Loading 10,000 rules from text: Airlock's `compile` (parse, validate, hash, index, static
/// analysis), Cedar's policy-set parse, and regorus' parse plus the first evaluation, where it
/// does its own analysis.
fn loading(c: &mut Criterion) {
    let set = RuleSet::generated(10_000);
    let empty = Rego::input(br#"{"topic": "none", "env": "none", "payload": {}}"#);
    let mut group = c.benchmark_group("load-rules-10000");
    // Each load takes a few hundred milliseconds: ten samples of equal size fit the default time.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("airlock", |b| b.iter(|| Airlock::new(black_box(&set))));
    group.bench_function("cedar", |b| b.iter(|| Cedar::new(black_box(&set))));
    group.bench_function("rego", |b| {
        b.iter(|| {
            let mut rego = Rego::new(black_box(&set));
            rego.decide(&empty);
            rego
        });
    });
    group.finish();
}

criterion_group!(benches, decisions, loading);
criterion_main!(benches);
