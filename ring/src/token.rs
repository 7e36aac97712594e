//! `user_data` encoding: slab index (32 bits), generation (24), kind (8).

/// What a completion belongs to; routes CQEs without a slab lookup for the
/// ring's own operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A caller's operation (file I/O, fsync, poll, timeout...).
    Op = 1,
    /// The ring's own wake-up poll on its eventfd.
    Wake = 2,
    /// A cancel request; its CQE carries nothing to deliver.
    Cancel = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub index: u32,
    pub generation: u32,
    pub kind: Kind,
}

pub const GENERATION_MASK: u32 = 0x00ff_ffff;

impl Token {
    pub fn encode(self) -> u64 {
        u64::from(self.index) | u64::from(self.generation & GENERATION_MASK) << 32 | (self.kind as u64) << 56
    }

    /// Decodes `user_data`; `None` for 0, u64::MAX and unknown kinds.
    pub fn decode(v: u64) -> Option<Token> {
        if v == 0 || v == u64::MAX {
            return None;
        }
        let kind = match (v >> 56) as u8 {
            1 => Kind::Op,
            2 => Kind::Wake,
            3 => Kind::Cancel,
            _ => return None,
        };
        Some(Token { index: v as u32, generation: (v >> 32) as u32 & GENERATION_MASK, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_reserved() {
        let t = Token { index: 0xdead_beef, generation: 0x12_3456, kind: Kind::Op };
        assert_eq!(Token::decode(t.encode()), Some(t));
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(u64::MAX), None);
        assert_eq!(Token::decode(0x7f00_0000_0000_0001), None);
        // Generations wrap within 24 bits.
        let w = Token { index: 1, generation: 0x1ff_ffff, kind: Kind::Cancel };
        assert_eq!(Token::decode(w.encode()).unwrap().generation, 0xff_ffff);
    }
}
