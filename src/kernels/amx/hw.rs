//! The real AMX instructions (`asm!`: stable Rust has no AMX intrinsics), and the checks that
//! the CPU has them and the OS lets this process use them.
use super::tiles::{config, TileUnit};
use std::arch::asm;
use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};

/// Linux: ask for permission to use a dynamically enabled XSAVE feature.
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
/// The XSAVE feature number of the AMX tile data.
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// `Ok` when this CPU has AMX-TILE and AMX-BF16 and the OS granted this process the tile
/// state; otherwise what is missing. Asks the OS once (the grant holds for the process).
pub(crate) fn support() -> Result<(), String> {
    // CPUID.(EAX=7,ECX=0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16.
    let edx = __cpuid_count(7, 0).edx;
    let lacks: Vec<&str> = [("AMX-TILE", 24), ("AMX-BF16", 22)]
        .iter()
        .filter(|(_, bit)| edx & (1 << bit) == 0)
        .map(|(name, _)| *name)
        .collect();
    if !lacks.is_empty() {
        return Err(format!("CPU lacks {}", lacks.join(", ")));
    }
    // CPUID.1:ECX bit 27: the OS uses XSAVE, so XCR0 can be read.
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return Err("OS has not enabled XSAVE".to_string());
    }
    // SAFETY: OSXSAVE is set, so `xgetbv` exists (checked just above).
    let xcr0 = unsafe { read_xcr0() };
    if xcr0 & (3 << 17) != 3 << 17 {
        return Err("OS does not enable the AMX tile state (XCR0 bits 17-18)".to_string());
    }
    request_tile_state()
}

#[target_feature(enable = "xsave")]
unsafe fn read_xcr0() -> u64 {
    _xgetbv(0)
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> Result<(), String> {
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes a feature number and touches no memory
    // of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "OS refused tile state (arch_prctl ARCH_REQ_XCOMP_PERM: {})",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> Result<(), String> {
    Err("tile state is only requested on Linux".to_string())
}

/// The hardware tiles.
#[derive(Default)]
pub(crate) struct AmxUnit;

// SAFETY: the instructions need AMX-TILE/AMX-BF16 and the OS grant, which the callers
// guarantee (the AMX table is handed out only after `support()` succeeded).
unsafe impl TileUnit for AmxUnit {
    #[inline(always)]
    unsafe fn configure(&mut self) {
        let cfg = config();
        asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack));
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        asm!("tilerelease", options(nostack));
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        asm!("tilezero tmm{t}", t = const T, options(nostack));
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
        asm!(
            "tileloadd tmm{t}, [{p} + {s} * 1]",
            t = const T,
            p = in(reg) p,
            s = in(reg) stride,
            options(nostack)
        );
    }
    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        asm!(
            "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack)
        );
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
        asm!(
            "tilestored [{p} + {s} * 1], tmm{t}",
            t = const T,
            p = in(reg) p,
            s = in(reg) stride,
            options(nostack)
        );
    }
}
