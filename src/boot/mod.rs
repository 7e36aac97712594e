//! Loading a guest kernel: a PVH ELF (Linux vmlinux, the test guest) or a
//! Linux bzImage (64-bit boot protocol), with an optional initrd and a
//! command line, plus the tables a guest needs to find RAM and CPUs.

pub mod acpi;
pub mod cpuid;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use self::regs::EntryMode;
use crate::error::{Error, Result};
use crate::layout::*;

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Where and how the boot CPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
    pub boot_info: u64,
    /// End of the kernel image (it starts at 1 MiB).
    pub kernel_end: u64,
    /// Where the initrd went: (address, size).
    pub initrd: Option<(u64, u64)>,
}

impl BootEntry {
    /// Guest-physical ranges the loader (and vCPU set-up) writes: low
    /// memory with the boot tables, the kernel, the initrd.
    pub fn written(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(0, HIMEM_START), (HIMEM_START, self.kernel_end.saturating_sub(HIMEM_START))];
        v.extend(self.initrd);
        v
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Opens a file that must be a regular file, without blocking: a FIFO (or
/// a device) named where a kernel, initrd or state file belongs would
/// otherwise hang the open or the reads for ever.
pub fn open_regular(what: &'static str, path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|source| Error::OpenFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let meta = f.metadata().map_err(|source| Error::OpenFile { what, path: path.to_owned(), source })?;
    if !meta.is_file() {
        return Err(Error::OpenFile { what, path: path.to_owned(), source: std::io::Error::other("not a regular file") });
    }
    Ok(f)
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    open_regular(what, path)
}

fn format_of(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == KERNEL_HDR_MAGIC {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Recognises the kernel file by its magic numbers.
pub fn probe_kernel(path: &Path) -> Result<KernelFormat> {
    let mut f = open("kernel", path)?;
    let mut head = [0u8; 0x208];
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::OpenFile { what: "kernel", path: path.to_owned(), source })?;
    format_of(&head[..n]).ok_or_else(|| Error::UnknownKernelFormat(path.to_owned()))
}

/// The kernel and initrd read into memory once (as QEMU keeps its boot
/// images): a guest reboot loads them again from here, never from the
/// paths, which may have changed or gone since.
#[derive(Clone, Debug)]
pub struct BootImages {
    pub spec: BootSpec,
    kernel: std::sync::Arc<[u8]>,
    initrd: Option<std::sync::Arc<[u8]>>,
    format: KernelFormat,
}

impl BootImages {
    pub fn read(spec: &BootSpec) -> Result<BootImages> {
        let slurp = |what: &'static str, path: &Path| -> Result<std::sync::Arc<[u8]>> {
            let mut f = open(what, path)?;
            let mut v = Vec::new();
            f.read_to_end(&mut v).map_err(|source| Error::OpenFile { what, path: path.to_owned(), source })?;
            Ok(v.into())
        };
        let kernel = slurp("kernel", &spec.kernel)?;
        let format = format_of(&kernel).ok_or_else(|| Error::UnknownKernelFormat(spec.kernel.clone()))?;
        let initrd = spec.initrd.as_deref().map(|p| slurp("initrd", p)).transpose()?;
        Ok(BootImages { spec: spec.clone(), kernel, initrd, format })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn write_obj<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, v: T, addr: u64) -> Result<()> {
    mem.write_obj(v, GuestAddress(addr)).map_err(|source| Error::GuestMemoryAccess { addr, source })
}

/// Loads kernel, initrd and command line from their files; writes the boot tables.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec, mem_size: u64, cpus: u8) -> Result<BootEntry> {
    load_images(mem, &BootImages::read(spec)?, mem_size, cpus)
}

/// Loads kernel, initrd and command line from `images`; writes the boot tables.
pub fn load_images(mem: &GuestMemoryMmap, images: &BootImages, mem_size: u64, cpus: u8) -> Result<BootEntry> {
    let spec = &images.spec;
    let format = images.format;
    let mut kernel = std::io::Cursor::new(&images.kernel[..]);
    let load_err = |source| Error::KernelLoad { path: spec.kernel.clone(), source };
    let (mode, entry, kernel_end, setup_header) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr.0, r.kernel_end, None),
                _ => return Err(Error::NoPvhNote(spec.kernel.clone())),
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            // The 64-bit entry point is 0x200 past the start of the protected-mode kernel.
            (EntryMode::Linux64, r.kernel_load.0 + 0x200, r.kernel_end, r.setup_header)
        }
    };

    let cmdline = spec.cmdline.as_bytes();
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE || cmdline.contains(&0) {
        return Err(Error::CmdlineTooLong(cmdline.len()));
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))
        .and_then(|_| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(|source| Error::GuestMemoryAccess { addr: CMDLINE_START, source })?;

    let low_end = mem_size.min(MMIO32_START);
    let initrd = match &spec.initrd {
        Some(path) => {
            let max = setup_header.map_or(INITRD_ADDR_MAX_DEFAULT, |h| u64::from(h.initrd_addr_max)).min(low_end - 1);
            let data = images.initrd.as_deref().unwrap_or_default();
            Some(load_initrd(mem, path, data, kernel_end, max)?)
        }
        None => None,
    };

    mptable::write(mem, cpus)?;
    let rsdp = acpi::write(mem, cpus)?;
    let e820 = e820_map(mem_size);

    let boot_info = match mode {
        EntryMode::Pvh => {
            let mut info = hvm_start_info {
                magic: PVH_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                rsdp_paddr: rsdp,
                ..Default::default()
            };
            if let Some((addr, size)) = initrd {
                write_obj(mem, hvm_modlist_entry { paddr: addr, size, ..Default::default() }, PVH_MODLIST_START)?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
            }
            for (i, (addr, size, type_)) in e820.iter().enumerate() {
                let entry = hvm_memmap_table_entry { addr: *addr, size: *size, type_: *type_, reserved: 0 };
                write_obj(mem, entry, PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64)?;
            }
            write_obj(mem, info, PVH_INFO_START)?;
            PVH_INFO_START
        }
        EntryMode::Linux64 => {
            let mut params = boot_params::default();
            if let Some(h) = setup_header {
                params.hdr = h;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline.len() as u32 + 1;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (i, (addr, size, type_)) in e820.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *type_ };
            }
            params.e820_entries = e820.len() as u8;
            params.acpi_rsdp_addr = rsdp;
            write_obj(mem, params, ZERO_PAGE_START)?;
            ZERO_PAGE_START
        }
    };
    log::info!("kernel {} ({format:?}) entry {entry:#x}, ends {kernel_end:#x}", spec.kernel.display());
    Ok(BootEntry { mode, entry, boot_info, kernel_end, initrd })
}

/// Places the initrd page-aligned as high as allowed, above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, data: &[u8], kernel_end: u64, max_addr: u64) -> Result<(u64, u64)> {
    let size = data.len() as u64;
    let too_big = || Error::InitrdTooBig { path: path.to_owned(), size, limit: max_addr };
    let start = (max_addr + 1).checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    mem.write_slice(data, GuestAddress(start)).map_err(|source| Error::GuestMemoryAccess { addr: start, source })?;
    Ok((start, size))
}
