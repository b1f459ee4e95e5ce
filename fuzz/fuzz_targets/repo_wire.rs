//! automerge-repo CBOR decoder: arbitrary frames never panic `RepoMessage::decode`, and what
//! decodes round-trips through `encode`. Inputs starting with 0xff instead build a message
//! from the remaining bytes and check `decode(encode(m)) == m`.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use automerge_relay::RepoMessage;
use libfuzzer_sys::fuzz_target;
use relay_fuzz::MsgSpec;

fuzz_target!(init: relay_fuzz::install_panic_hook(), |data: &[u8]| {
    relay_fuzz::fail_on_uncaught(|| {
        relay_fuzz::check_wire(data);
        if let Some((0xff, rest)) = data.split_first() {
            if let Ok(spec) = MsgSpec::arbitrary_take_rest(Unstructured::new(rest)) {
                let msg = spec.msg();
                let back = RepoMessage::decode(&msg.encode())
                    .unwrap_or_else(|e| panic!("{msg:?} does not decode after encode: {e}"));
                assert_eq!(back, msg);
            }
        }
    });
});
