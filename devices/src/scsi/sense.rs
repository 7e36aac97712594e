//! Fixed-format sense data (SPC-4 4.5.3).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const NO_SENSE: Sense = Sense { key: 0x00, asc: 0x00, ascq: 0x00 };
    pub const INVALID_OPCODE: Sense = Sense { key: 0x05, asc: 0x20, ascq: 0x00 };
    pub const LBA_OUT_OF_RANGE: Sense = Sense { key: 0x05, asc: 0x21, ascq: 0x00 };
    pub const INVALID_FIELD: Sense = Sense { key: 0x05, asc: 0x24, ascq: 0x00 };
    pub const LUN_NOT_SUPPORTED: Sense = Sense { key: 0x05, asc: 0x25, ascq: 0x00 };
    pub const INVALID_PARAM_LIST: Sense = Sense { key: 0x05, asc: 0x26, ascq: 0x00 };
    pub const SAVING_NOT_SUPPORTED: Sense = Sense { key: 0x05, asc: 0x39, ascq: 0x00 };
    pub const WRITE_PROTECTED: Sense = Sense { key: 0x07, asc: 0x27, ascq: 0x00 };
    pub const SPACE_ALLOC_FAILED: Sense = Sense { key: 0x07, asc: 0x27, ascq: 0x07 };
    pub const READ_ERROR: Sense = Sense { key: 0x03, asc: 0x11, ascq: 0x00 };
    pub const WRITE_ERROR: Sense = Sense { key: 0x03, asc: 0x0c, ascq: 0x00 };
    pub const ABORTED: Sense = Sense { key: 0x0b, asc: 0x00, ascq: 0x00 };
    /// I_T nexus / LUN reset occurred (unit attention after a reset).
    pub const RESET_OCCURRED: Sense = Sense { key: 0x06, asc: 0x29, ascq: 0x00 };

    /// The 18-byte fixed format, current error.
    pub fn fixed(self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Sense for a failed host I/O: medium errors for EIO and friends,
    /// space allocation failure for ENOSPC/EDQUOT.
    pub fn from_errno(errno: i32, write: bool) -> Sense {
        match errno {
            libc::ENOSPC | libc::EDQUOT => Sense::SPACE_ALLOC_FAILED,
            libc::EROFS | libc::EPERM | libc::EACCES => Sense::WRITE_PROTECTED,
            libc::ECANCELED => Sense::ABORTED,
            _ if write => Sense::WRITE_ERROR,
            _ => Sense::READ_ERROR,
        }
    }
}
