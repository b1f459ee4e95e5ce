//! What an error reading the socket means.
//!
//! tungstenite reports a message over the size limit, a peer that vanished and a malformed
//! frame through one error type, and each needs its own answer: close 1009, nothing (nobody is
//! listening any more) and close 1002. Counting them all as `message_too_big` (as the loop once
//! did) made 2,000 clients that merely dropped their connections look like an attack.
//!
//! axum hides tungstenite's error type, so the error chain is read instead: an I/O error
//! anywhere in it means the connection is gone; the rest is told apart by tungstenite's own
//! messages, which the tests below pin by building the real errors.

use std::error::Error;

/// Why reading the socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broken {
    /// A message or frame over `--max-body`.
    TooBig,
    /// The connection ended without a close frame (reset, or closed mid-stream).
    Lost,
    /// A frame that breaks the WebSocket protocol (bad opcode, unmasked, invalid UTF-8, …).
    Malformed,
}

/// tungstenite's `Error::Capacity` ("Space limit exceeded: Message too long: …").
const CAPACITY: &str = "Space limit exceeded";
/// tungstenite's `ProtocolError::ResetWithoutClosingHandshake`: end of stream before a close.
const RESET: &str = "Connection reset without closing handshake";

pub(super) fn classify(error: &(dyn Error + 'static)) -> Broken {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some() {
            return Broken::Lost;
        }
        let text = e.to_string();
        if text.contains(CAPACITY) {
            return Broken::TooBig;
        }
        if text.contains(RESET) {
            return Broken::Lost;
        }
        next = e.source();
    }
    Broken::Malformed
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    use tokio_tungstenite::tungstenite::Error as WsError;

    use super::*;

    /// As the loop sees it: tungstenite's error inside axum's.
    fn from_axum(e: WsError) -> Broken {
        classify(&axum::Error::new(e))
    }

    #[test]
    fn each_error_of_the_socket_has_its_kind() {
        let too_long = CapacityError::MessageTooLong {
            size: 17 << 20,
            max_size: 16 << 20,
        };
        assert_eq!(from_axum(WsError::Capacity(too_long)), Broken::TooBig);
        assert_eq!(
            from_axum(WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            Broken::Lost
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(from_axum(WsError::Io(reset)), Broken::Lost);
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(from_axum(WsError::Io(pipe)), Broken::Lost);
        for bad in [
            ProtocolError::NonZeroReservedBits,
            ProtocolError::UnmaskedFrameFromClient,
            ProtocolError::FragmentedControlFrame,
        ] {
            assert_eq!(from_axum(WsError::Protocol(bad)), Broken::Malformed);
        }
        assert_eq!(from_axum(WsError::Utf8("bad".into())), Broken::Malformed);
    }
}
