//! Any bytes a peer can send must decode to a frame or an error, never a
//! panic; a frame that decodes must encode back to the same bytes.
#![no_main]

use bytes::Bytes;
use ktb_proto::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data)) {
        let again = Frame::decode(frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again, frame);
    }
});
