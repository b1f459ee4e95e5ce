//! Interop with the real JavaScript packages: runs the Node suites in tests/js
//! (`@automerge/automerge`, `@automerge/automerge-repo` + websocket adapter, pinned by
//! tests/js/package-lock.json) against the relay binary built for this test run.
//! `scripts/test` installs the packages; without them this test fails, it does not skip.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn javascript_clients_interoperate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/@automerge/automerge-repo").is_dir(),
        "npm packages missing: run `npm ci --prefix tests/js` (scripts/test does this)"
    );
    let status = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=2")
        .current_dir(&dir)
        .env("RELAY_BIN", env!("CARGO_BIN_EXE_automerge-relay"))
        .status()
        .expect("run node (Node.js 20+ must be installed)");
    assert!(status.success(), "the Node interop suites failed: {status}");
}
