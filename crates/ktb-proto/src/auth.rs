//! Who may attach to an agent: the holder of a private key that never leaves
//! the laptop.
//!
//! The CLI generates an Ed25519 key pair for each session, in memory, and
//! gives the agent only the public half (a flag in its pod spec, which every
//! colleague in the namespace may read: that is fine, a public key lets
//! nobody in). Every tunnel connection then proves possession of the private
//! key afresh: the agent sends a random [`Nonce`] as its challenge and the
//! client answers with a [`Proof`], a signature over
//!
//! ```text
//! CONTEXT ("ktb tunnel v3" and a NUL) ‖ agent challenge (32 bytes) ‖ client nonce (32 bytes)
//! ```
//!
//! - the context string keeps these signatures apart from anything else the
//!   key could ever sign, in this protocol version or another;
//! - the agent's challenge makes each proof good for one connection only, so
//!   a proof seen on the wire, in a log or a packet capture does not replay;
//! - the client's nonce, sent in `Hello` before the challenge is known,
//!   means the client never signs a message chosen by the other side alone,
//!   so whatever answers the client's connection cannot use it as a signing
//!   oracle. The agent signs nothing, so it cannot be one either.
//!
//! Public keys are written as 64 lowercase hexadecimal digits (the 32 bytes
//! of the compressed point); that is what `ktb-agent --client-key` takes.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroize;

/// Bytes of a nonce, a public key's text form being twice this long.
pub const NONCE_LEN: usize = 32;
/// Bytes of a [`Proof`] (an Ed25519 signature).
pub const PROOF_LEN: usize = 64;
/// Separates tunnel proofs from every other use of a key; names the
/// protocol version so that a later version's proofs never verify here.
const CONTEXT: &[u8] = b"ktb tunnel v3\0";

/// Fresh randomness from one side of the handshake: the client's nonce in
/// `Hello`, or the agent's challenge.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// 32 bytes from the operating system's generator.
    pub fn random() -> Result<Nonce, KeyError> {
        let mut bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut bytes).map_err(KeyError::Randomness)?;
        Ok(Nonce(bytes))
    }

    /// Lowercase hex, the form `Hello` carries it in.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses exactly 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Nonce> {
        parse_hex(text).map(Nonce)
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.to_hex())
    }
}

/// The client's answer to a challenge: an Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Proof(pub [u8; PROOF_LEN]);

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proof({})", hex(&self.0))
    }
}

/// The private key of one session. Lives in the memory of the `ktb`
/// process that generated it; this crate offers no way to write it out.
pub struct ClientKey(SigningKey);

impl ClientKey {
    /// A new key pair from the operating system's generator.
    pub fn generate() -> Result<ClientKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(KeyError::Randomness)?;
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        Ok(ClientKey(key))
    }

    /// What the agent is given.
    pub fn public(&self) -> ClientPublicKey {
        ClientPublicKey(self.0.verifying_key())
    }

    /// Answers the agent's `challenge` on a connection whose `Hello` carried
    /// `client_nonce`.
    pub fn prove(&self, challenge: &Nonce, client_nonce: &Nonce) -> Proof {
        Proof(
            self.0
                .sign(&signed_message(challenge, client_nonce))
                .to_bytes(),
        )
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey(public {})", self.public())
    }
}

/// The public half of a [`ClientKey`]: all an agent knows of its client.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClientPublicKey(VerifyingKey);

impl ClientPublicKey {
    /// Whether `proof` answers `challenge` for a connection whose `Hello`
    /// carried `client_nonce`. Strict verification: no small-order points,
    /// no non-canonical encodings, so one proof has exactly one valid form.
    pub fn verify(&self, challenge: &Nonce, client_nonce: &Nonce, proof: &Proof) -> bool {
        let signature = Signature::from_bytes(&proof.0);
        self.0
            .verify_strict(&signed_message(challenge, client_nonce), &signature)
            .is_ok()
    }
}

impl fmt::Display for ClientPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(self.0.as_bytes()))
    }
}

impl fmt::Debug for ClientPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientPublicKey({self})")
    }
}

impl FromStr for ClientPublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = parse_hex(text).ok_or(KeyError::NotHex { len: text.len() })?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAKey)?;
        // A small-order key would accept forged signatures; ed25519-dalek's
        // generator never makes one, so it can only be a mistake or an attack.
        if key.is_weak() {
            return Err(KeyError::NotAKey);
        }
        Ok(ClientPublicKey(key))
    }
}

/// Why a key could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random generator failed: {0}")]
    Randomness(getrandom::Error),
    #[error(
        "a client key is 64 hexadecimal digits (got {len} characters): \
         pass the public key `ktb` printed or put in the pod spec"
    )]
    NotHex { len: usize },
    #[error("not an Ed25519 public key: pass the public key `ktb` printed or put in the pod spec")]
    NotAKey,
}

fn signed_message(challenge: &Nonce, client_nonce: &Nonce) -> [u8; CONTEXT.len() + 2 * NONCE_LEN] {
    let mut message = [0u8; CONTEXT.len() + 2 * NONCE_LEN];
    let (context, rest) = message.split_at_mut(CONTEXT.len());
    let (agent, client) = rest.split_at_mut(NONCE_LEN);
    context.copy_from_slice(CONTEXT);
    agent.copy_from_slice(&challenge.0);
    client.copy_from_slice(&client_nonce.0);
    message
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Exactly 64 hex digits (either case) into 32 bytes.
fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = (pair[0] as char).to_digit(16)?;
        let low = (pair[1] as char).to_digit(16)?;
        *byte = (high << 4 | low) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonces() -> (Nonce, Nonce) {
        (Nonce::random().unwrap(), Nonce::random().unwrap())
    }

    #[test]
    fn a_proof_verifies_for_its_key_challenge_and_nonce_only() {
        let key = ClientKey::generate().unwrap();
        let other = ClientKey::generate().unwrap();
        let (challenge, nonce) = nonces();
        let proof = key.prove(&challenge, &nonce);
        assert!(key.public().verify(&challenge, &nonce, &proof));
        assert!(!other.public().verify(&challenge, &nonce, &proof));
        let (fresh_challenge, fresh_nonce) = nonces();
        assert!(
            !key.public().verify(&fresh_challenge, &nonce, &proof),
            "a proof does not answer another challenge (replay)"
        );
        assert!(!key.public().verify(&challenge, &fresh_nonce, &proof));
        assert!(
            !key.public().verify(&nonce, &challenge, &proof),
            "the two nonces are not interchangeable"
        );
        let mut tampered = proof;
        tampered.0[10] ^= 1;
        assert!(!key.public().verify(&challenge, &nonce, &tampered));
    }

    #[test]
    fn public_keys_round_trip_through_lowercase_hex() {
        let public = ClientKey::generate().unwrap().public();
        let text = public.to_string();
        assert_eq!(text.len(), 64);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_eq!(text.parse::<ClientPublicKey>().unwrap(), public);
        assert_eq!(
            text.to_uppercase().parse::<ClientPublicKey>().unwrap(),
            public
        );
        assert_eq!(
            format!(" {text}\n").parse::<ClientPublicKey>().unwrap(),
            public
        );
    }

    #[test]
    fn malformed_and_weak_keys_are_refused_with_advice() {
        let short = "abcd".parse::<ClientPublicKey>().unwrap_err().to_string();
        assert!(short.contains("64 hexadecimal digits (got 4"), "{short}");
        assert!("zz".repeat(32).parse::<ClientPublicKey>().is_err());
        // The identity point: small order, would accept forgeries.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = hex(&identity).parse::<ClientPublicKey>().unwrap_err();
        assert!(matches!(weak, KeyError::NotAKey), "{weak}");
    }

    #[test]
    fn the_private_key_does_not_show_in_debug_output() {
        let key = ClientKey::generate().unwrap();
        let secret = hex(key.0.as_bytes());
        let shown = format!("{key:?}");
        assert!(!shown.contains(&secret), "{shown}");
        assert!(shown.contains(&key.public().to_string()));
    }

    #[test]
    fn nonces_round_trip_through_hex() {
        let nonce = Nonce::random().unwrap();
        assert_eq!(Nonce::from_hex(&nonce.to_hex()), Some(nonce));
        assert_eq!(Nonce::from_hex("00"), None);
        assert_eq!(Nonce::from_hex(&"é".repeat(32)), None);
    }
}
