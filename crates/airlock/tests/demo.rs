//! The README's first command: `airlock demo` runs every case through the real binary and
//! exits 0.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::process::Command;

#[test]
fn the_demo_narrates_every_case_and_exits_0() {
    let output = Command::new(env!("CARGO_BIN_EXE_airlock")).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    for case in [
        "1. An allowed job runs.",
        "2. A denied job never enters the queue",
        "3. A throttled topic",
        "4. A production delete waits for a human",
        "5. The policy turns to deny between submit and dispatch",
        "6. An approval goes stale",
        "7. The safety check goes down; fail mode `closed`",
        "8. The same outage with fail mode `open`",
        "chain verifies",
        "Demo complete",
    ] {
        assert!(text.contains(case), "missing `{case}` in\n{text}");
    }
}
