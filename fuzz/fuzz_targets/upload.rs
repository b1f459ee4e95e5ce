//! HTTP upload / per-document WebSocket input: arbitrary bytes through `parse_upload` and
//! `parse_upload_with` (hint chosen from the input's length). Both transports hand client bytes
//! to exactly these functions (`http::validate`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if relay_fuzz::skip_known(data) {
        return;
    }
    if let Ok(up) = relay_fuzz::check_upload(data, data.len() as u8) {
        relay_fuzz::check_accepted_loads(data, &up);
    }
});
