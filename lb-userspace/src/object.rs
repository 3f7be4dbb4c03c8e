//! The eBPF object embedded at build time (see `build.rs`).

use crate::Error;

/// The bytes of the kernel programs' ELF object.
pub fn bytes() -> Result<&'static [u8], Error> {
    #[cfg(xlb_ebpf_object)]
    {
        Ok(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/lb-ebpf.o"
        )))
    }
    #[cfg(not(xlb_ebpf_object))]
    {
        Err(Error::MissingObject)
    }
}
