//! Document ids and `?since=` head lists: `DocId::parse` accepts exactly the documented id rule (docs/http-api.md),
//! `parse_heads` exactly comma-separated 64-digit hex hashes, and `etag_for` ignores order.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: relay_fuzz::install_panic_hook(), |data: &[u8]| {
    relay_fuzz::fail_on_uncaught(|| match std::str::from_utf8(data) {
        Ok(s) => relay_fuzz::check_ids(s),
        Err(_) => relay_fuzz::check_ids(&String::from_utf8_lossy(data)),
    });
});
