//! The client-example todo app in a real browser (Debian chromium driven by playwright-core):
//! runs `npm test` in client-example against the relay binary built for this test run, started
//! with a temporary `--auth-tokens` file (the pages present a token, as against a real deployment).
//! `scripts/test` installs the npm packages and Debian's chromium; without them this test
//! fails, it does not skip.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn todo_app_syncs_between_two_browsers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("client-example");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "npm packages missing: run `npm ci --prefix client-example` (scripts/test does this)"
    );
    let status = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&dir)
        .env("RELAY_BIN", env!("CARGO_BIN_EXE_automerge-relay"))
        .status()
        .expect("run npm (Node.js 20+ must be installed)");
    assert!(status.success(), "the browser tests failed: {status}");
}
