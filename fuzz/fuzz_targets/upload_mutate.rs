//! Structured upload input: a real Automerge document built from fuzzer-chosen operations,
//! saved as a full save, an uncompressed save, `save_after`, concatenated change chunks or a
//! bundle, then truncated / bit-flipped / junk-appended. Valid saves must parse to exactly
//! their changes; mutated ones must be rejected or carry only the original's changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::MutateInput;

fuzz_target!(init: relay_fuzz::install_panic_hook(), |input: MutateInput| {
    relay_fuzz::fail_on_uncaught(|| relay_fuzz::run_mutate(&input));
});
