//! automerge-repo protocol core: a `Connection` fed a sequence of frames never panics, does
//! nothing but handshake/errors before a join, and emits well-formed actions.
//! Byte 0 bit 1 clear: raw frames (see `relay_fuzz::raw_frames`; bit 0 adds a valid join).
//! Bit 1 set: a structured script (mostly valid messages from the joined peer, real sync data).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use relay_fuzz::ProtocolScript;

fuzz_target!(init: relay_fuzz::install_panic_hook(), |data: &[u8]| {
    relay_fuzz::fail_on_uncaught(|| {
        let frames = match data.first() {
            Some(flags) if flags & 2 == 2 => {
                match ProtocolScript::arbitrary_take_rest(Unstructured::new(&data[1..])) {
                    Ok(script) => script.frames(),
                    Err(_) => return,
                }
            }
            _ => relay_fuzz::raw_frames(data),
        };
        relay_fuzz::run_connection(&frames);
    });
});
