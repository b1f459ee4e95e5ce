//! HTTP upload / per-document WebSocket input: arbitrary bytes through `parse_upload` and
//! `parse_upload_with` (hint chosen from the input's length). Both transports hand client bytes
//! to exactly these functions (`http::validate`). The panics they catch on purpose (automerge's
//! decoder on malformed chunks) are answered as invalid input, not crashes: see
//! `relay_fuzz::install_panic_hook`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: relay_fuzz::install_panic_hook(), |data: &[u8]| {
    relay_fuzz::fail_on_uncaught(|| {
        if let Ok(up) = relay_fuzz::check_upload(data, data.len() as u8) {
            relay_fuzz::check_accepted_loads(data, &up);
        }
    });
});
