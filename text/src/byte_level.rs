//! GPT-2's byte-level alphabet: how a vocabulary string such as `Ġhello` stands for bytes.
//!
//! Every byte has one printable character: printable Latin-1 bytes stand for themselves and the
//! other 68 were shifted to U+0100.. in byte order. Byte-level BPE vocabularies (`gpt2` in GGUF)
//! store their tokens in this form; this module turns them back into the bytes they print.

/// The byte GPT-2's byte-level alphabet maps `c` to, if `c` is in it.
pub(crate) fn byte_of_char(c: char) -> Option<u8> {
    let cp = c as u32;
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(cp) {
        return Some(cp as u8);
    }
    // The n-th non-printable byte in byte order: 0x00..=0x20, 0x7F..=0xA0, 0xAD.
    match cp.checked_sub(0x100)? {
        n @ 0..=32 => Some(n as u8),
        n @ 33..=66 => Some((0x7F + n - 33) as u8),
        67 => Some(0xAD),
        _ => None,
    }
}

/// Bytes of a byte-level token string. Like the reference decoder, a string
/// with a character outside the alphabet is taken verbatim.
pub(crate) fn byte_level_decode(token: &str) -> Box<[u8]> {
    token
        .chars()
        .map(byte_of_char)
        .collect::<Option<Vec<u8>>>()
        .map(Vec::into_boxed_slice)
        .unwrap_or_else(|| token.as_bytes().into())
}

/// The alphabet in byte order, as token strings (what tests build vocabularies from).
#[cfg(test)]
pub(crate) fn byte_alphabet() -> Vec<String> {
    let mut by_byte = vec![String::new(); 256];
    for cp in 0u32..0x200 {
        if let Some(c) = char::from_u32(cp) {
            if let Some(b) = byte_of_char(c) {
                by_byte[b as usize] = String::from(c);
            }
        }
    }
    by_byte
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let alphabet = byte_alphabet();
        let mut seen = std::collections::HashSet::new();
        for (b, s) in alphabet.iter().enumerate() {
            assert_eq!(s.chars().count(), 1, "byte {b}");
            assert!(seen.insert(s.clone()));
            assert_eq!(byte_level_decode(s).as_ref(), &[b as u8]);
        }
        assert_eq!(alphabet[b' ' as usize], "Ġ");
        assert_eq!(alphabet[b'\n' as usize], "Ċ");
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('€'), None);
        assert_eq!(byte_level_decode("<tool_call>").as_ref(), b"<tool_call>");
        assert_eq!(byte_level_decode("x€").as_ref(), "x€".as_bytes(), "outside the alphabet: verbatim");
    }
}
