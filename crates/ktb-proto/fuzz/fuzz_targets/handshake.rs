//! The agent's side of the handshake fed whatever a client might send,
//! before it has proved anything: it must never panic, never authenticate
//! without a valid proof, and stay over once it has authenticated or
//! refused.
//!
//! The input is a sequence of messages, each a tag byte and a length byte
//! followed by that many bytes. An odd tag stands for "a valid proof for
//! the challenge just received" (built here with the client's key, since
//! the agent's challenge is random), so the fuzzer reaches the
//! authenticated state as well as every refusal.
#![no_main]

use bytes::Bytes;
use ktb_proto::auth::Nonce;
use ktb_proto::handshake::{AgentHandshake, Hello, Step};
use ktb_proto::{ClientKey, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = ClientKey::generate().expect("randomness");
    let mut agent = AgentHandshake::new(key.public());
    let mut client_nonce: Option<Nonce> = None;
    let mut challenge: Option<Nonce> = None;
    let mut over = false;
    let mut rest = data;
    while let [tag, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        let genuine = tag % 2 == 1;
        let message = match (genuine, challenge, client_nonce) {
            (true, Some(challenge), Some(nonce)) => {
                Frame::Proof(key.prove(&challenge, &nonce)).encode()
            }
            _ => Bytes::copy_from_slice(body),
        };
        if let Ok(Frame::Hello(Hello { nonce, .. })) = Frame::decode(message.clone()) {
            client_nonce.get_or_insert(nonce);
        }
        let sent_genuine_proof = genuine && challenge.is_some() && client_nonce.is_some();
        match agent.on_message(message) {
            Ok(Step::Reply(Frame::Challenge(nonce))) => {
                assert!(!over, "a challenge after the handshake was over");
                challenge = Some(nonce);
            }
            Ok(Step::Reply(other)) => panic!("the agent only ever replies a challenge: {other:?}"),
            Ok(Step::Authenticated { .. }) => {
                assert!(!over, "authenticated twice");
                assert!(sent_genuine_proof, "authenticated without a valid proof");
                over = true;
            }
            Err(_) => over = true,
        }
        if over {
            challenge = None;
        }
    }
});
