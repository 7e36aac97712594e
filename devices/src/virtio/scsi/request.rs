//! A command request's shape (virtio 1.x, 5.6.6.1), decoded without
//! touching guest memory: where its header, data-out, response and
//! data-in lie in the chain's segments, and what the header says. Pure
//! functions, unit-tested here and driven through the whole device by the
//! `virtio_scsi_chain` fuzz target.

use vm_memory::GuestAddress;

use super::{SEG_MAX, S_BAD_TARGET};

/// Guest memory segments of a chain; a request rarely has more than four,
/// so they stay off the heap.
pub(super) type Segs = smallvec::SmallVec<[(GuestAddress, usize); 4]>;

/// Bytes in `segs`.
pub(super) fn total(segs: &[(GuestAddress, usize)]) -> u64 {
    segs.iter().map(|s| s.1 as u64).sum()
}

/// Splits `segs` at byte `at`: (first part, rest).
pub(super) fn split(segs: &[(GuestAddress, usize)], mut at: usize) -> (Segs, Segs) {
    let (mut a, mut b) = (Segs::new(), Segs::new());
    for &(addr, len) in segs {
        if at >= len {
            a.push((addr, len));
            at -= len;
        } else if at > 0 {
            a.push((addr, at));
            b.push((GuestAddress(addr.0 + at as u64), len - at));
            at = 0;
        } else {
            b.push((addr, len));
        }
    }
    (a, b)
}

/// A chain's descriptors, in order: (address, length, device-writable).
pub(super) struct Chain {
    /// Device-readable segments (request header, then data-out).
    pub rd: Segs,
    /// Device-writable segments (response, then data-in).
    pub wr: Segs,
    /// A readable descriptor came after a writable one.
    pub bad_order: bool,
    pub descriptors: u32,
}

impl Chain {
    pub(super) fn new() -> Chain {
        Chain { rd: Segs::new(), wr: Segs::new(), bad_order: false, descriptors: 0 }
    }

    pub(super) fn push(&mut self, addr: GuestAddress, len: usize, writable: bool) {
        self.descriptors += 1;
        if writable {
            self.wr.push((addr, len));
        } else {
            if !self.wr.is_empty() {
                self.bad_order = true;
            }
            self.rd.push((addr, len));
        }
    }
}

/// Where a request's pieces are in guest memory.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Req {
    pub(super) head: u16,
    pub(super) resp: Segs,
    pub(super) data_out: Segs,
    pub(super) data_in: Segs,
}

/// How a command request is laid out, or why it cannot be served.
#[derive(Debug, PartialEq)]
pub(super) enum Layout {
    /// Well formed: the header's segments, and the request.
    Ok { header: Segs, req: Req },
    /// No room for a response: the head goes back with nothing written.
    NoResponse,
    /// Malformed (order, descriptor count, header too short): answered
    /// VIRTIO_SCSI_S_FAILURE in its response.
    Failure(Req),
}

/// Lays a command request out over `chain` for the negotiated CDB and
/// sense sizes (virtio_scsi_cmd_req is 19 bytes + cdb, the response 12 +
/// sense).
pub(super) fn layout(head: u16, chain: &Chain, cdb_size: usize, sense_size: usize) -> Layout {
    let resp_len = 12 + sense_size;
    let (resp, data_in) = split(&chain.wr, resp_len);
    if total(&resp) < resp_len as u64 {
        return Layout::NoResponse;
    }
    let req_len = 19 + cdb_size;
    let (header, data_out) = split(&chain.rd, req_len);
    let req = Req { head, resp, data_out, data_in };
    if chain.bad_order || chain.descriptors > SEG_MAX + 2 || total(&header) < req_len as u64 {
        return Layout::Failure(req);
    }
    Layout::Ok { header, req }
}

/// What a command request's header says.
#[derive(Debug, PartialEq)]
pub(super) struct Header<'a> {
    /// The LUN (flat space addressing, 14 bits).
    pub lun: u16,
    pub tag: u64,
    pub cdb: &'a [u8],
}

/// Decodes virtio_scsi_cmd_req (`bytes` is 19 + cdb_size long): only
/// target 0 of bus 1 exists; anything else is VIRTIO_SCSI_S_BAD_TARGET.
pub(super) fn header(bytes: &[u8], cdb_size: usize) -> Result<Header<'_>, u8> {
    if bytes.len() < 19 + cdb_size {
        return Err(super::S_FAILURE);
    }
    let lun = &bytes[0..8];
    if lun[0] != 1 || lun[1] != 0 {
        return Err(S_BAD_TARGET);
    }
    Ok(Header {
        lun: u16::from_be_bytes([lun[2], lun[3]]) & 0x3fff,
        tag: u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()),
        cdb: &bytes[19..19 + cdb_size],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(descs: &[(u64, usize, bool)]) -> Chain {
        let mut c = Chain::new();
        for &(a, l, w) in descs {
            c.push(GuestAddress(a), l, w);
        }
        c
    }

    fn segs(v: &[(u64, usize)]) -> Segs {
        v.iter().map(|&(a, l)| (GuestAddress(a), l)).collect()
    }

    #[test]
    fn split_cuts_inside_a_segment() {
        let (a, b) = split(&segs(&[(0x1000, 10), (0x2000, 10)]), 15);
        assert_eq!((a, b), (segs(&[(0x1000, 10), (0x2000, 5)]), segs(&[(0x2005, 5)])));
        let (a, b) = split(&segs(&[(0x1000, 10)]), 30);
        assert_eq!((total(&a), b.len()), (10, 0));
    }

    /// Header and data-out in one descriptor, response and data-in in
    /// one: each piece where the spec puts it.
    #[test]
    fn a_read_laid_out_over_two_descriptors() {
        let c = chain(&[(0x1000, 51 + 512, false), (0x8000, 108 + 4096, true)]);
        let Layout::Ok { header, req } = layout(7, &c, 32, 96) else { panic!("refused") };
        assert_eq!(header, segs(&[(0x1000, 51)]));
        assert_eq!(req.data_out, segs(&[(0x1000 + 51, 512)]));
        assert_eq!(req.resp, segs(&[(0x8000, 108)]));
        assert_eq!(req.data_in, segs(&[(0x8000 + 108, 4096)]));
        assert_eq!(req.head, 7);
    }

    #[test]
    fn malformed_chains_are_refused_the_right_way() {
        // No room for the response: nothing can be said.
        assert_eq!(layout(0, &chain(&[(0x1000, 51, false), (0x8000, 107, true)]), 32, 96), Layout::NoResponse);
        // Readable after writable.
        let c = chain(&[(0x1000, 40, false), (0x8000, 108, true), (0x2000, 11, false)]);
        assert!(matches!(layout(0, &c, 32, 96), Layout::Failure(_)));
        // A header shorter than 19 + cdb_size.
        assert!(matches!(layout(0, &chain(&[(0x1000, 50, false), (0x8000, 108, true)]), 32, 96), Layout::Failure(_)));
        // More descriptors than seg_max allows.
        let mut many = vec![(0x1000, 51, false)];
        many.extend((0..SEG_MAX as u64 + 2).map(|i| (0x10000 + i * 0x1000, 512, true)));
        assert!(matches!(layout(0, &chain(&many), 32, 96), Layout::Failure(_)));
    }

    #[test]
    fn the_header_names_lun_tag_and_cdb() {
        let mut b = vec![0u8; 51];
        b[0..4].copy_from_slice(&[1, 0, 0x40, 5]); // flat space addressing, LUN 5
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        b[19] = 0x28;
        let h = header(&b, 32).unwrap();
        assert_eq!((h.lun, h.tag, h.cdb[0], h.cdb.len()), (5, 0x1122_3344_5566_7788, 0x28, 32));
        b[0] = 2; // another bus
        assert_eq!(header(&b, 32), Err(S_BAD_TARGET));
        b[0] = 1;
        b[1] = 1; // another target
        assert_eq!(header(&b, 32), Err(S_BAD_TARGET));
        assert!(header(&b[..50], 32).is_err());
    }
}
