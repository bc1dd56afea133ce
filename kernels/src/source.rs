//! The typed table of gati's CUDA modules and their kernels. Each module is
//! one `.cu` file under `kernels/cu/`, embedded in the binary; a device
//! compiles and loads a module the first time one of its kernels is launched.

/// One `.cu` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Epilogue,
    CacheLookup,
    Compact,
    Layout,
}

/// One `__global__` function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    BlockEpilogue,
    CacheLookup,
    CompactIndex,
    GatherRows,
    NhwcToNchw,
    RowBiasAct,
    Pad2d,
}

impl Module {
    /// Every module, in table order ([`Self::index`]).
    pub const ALL: [Module; 4] = [Module::Epilogue, Module::CacheLookup, Module::Compact, Module::Layout];

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The file name under `kernels/cu/`.
    pub fn file(self) -> &'static str {
        match self {
            Module::Epilogue => "epilogue.cu",
            Module::CacheLookup => "cache_lookup.cu",
            Module::Compact => "compact.cu",
            Module::Layout => "layout.cu",
        }
    }

    /// The CUDA C source.
    pub fn source(self) -> &'static str {
        match self {
            Module::Epilogue => include_str!("../cu/epilogue.cu"),
            Module::CacheLookup => include_str!("../cu/cache_lookup.cu"),
            Module::Compact => include_str!("../cu/compact.cu"),
            Module::Layout => include_str!("../cu/layout.cu"),
        }
    }

    /// The kernels it defines.
    pub fn kernels(self) -> &'static [Kernel] {
        match self {
            Module::Epilogue => &[Kernel::BlockEpilogue],
            Module::CacheLookup => &[Kernel::CacheLookup],
            Module::Compact => &[Kernel::CompactIndex, Kernel::GatherRows],
            Module::Layout => &[Kernel::NhwcToNchw, Kernel::RowBiasAct, Kernel::Pad2d],
        }
    }
}

/// The type of one kernel parameter, as the launch code passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (`T*`; null for an absent optional buffer).
    Ptr,
    I32,
    I64,
    F32,
}

impl Param {
    /// Its PTX parameter type (`.u64`, `.u32`, `.f32`).
    pub fn ptx(self) -> &'static str {
        match self {
            Param::Ptr | Param::I64 => "u64",
            Param::I32 => "u32",
            Param::F32 => "f32",
        }
    }
}

impl Kernel {
    /// Its parameters, in order: the launch code checks every argument list
    /// against this, and the PTX test checks this against the compiled kernel.
    pub fn params(self) -> &'static [Param] {
        use Param::{Ptr as P, F32, I32 as I, I64};
        match self {
            Kernel::BlockEpilogue => &[P, P, P, P, P, P, P, I, I, I, I, I],
            Kernel::CacheLookup => &[P, I, P, P, P, P, I, P, P, P, P, I, I, I, F32, P, P, P, P],
            Kernel::CompactIndex => &[P, I, P, P],
            Kernel::GatherRows => &[P, P, P, P, I64],
            Kernel::NhwcToNchw => &[P, P, I, I, I, I],
            Kernel::RowBiasAct => &[P, P, I, I, I],
            Kernel::Pad2d => &[P, P, I, I, I, I, I, I, I],
        }
    }

    /// Every kernel.
    pub const ALL: [Kernel; 7] = [
        Kernel::BlockEpilogue,
        Kernel::CacheLookup,
        Kernel::CompactIndex,
        Kernel::GatherRows,
        Kernel::NhwcToNchw,
        Kernel::RowBiasAct,
        Kernel::Pad2d,
    ];

    /// The module that defines it.
    pub fn module(self) -> Module {
        match self {
            Kernel::BlockEpilogue => Module::Epilogue,
            Kernel::CacheLookup => Module::CacheLookup,
            Kernel::CompactIndex | Kernel::GatherRows => Module::Compact,
            Kernel::NhwcToNchw | Kernel::RowBiasAct | Kernel::Pad2d => Module::Layout,
        }
    }

    /// Its `extern "C"` name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::BlockEpilogue => "gati_block_epilogue",
            Kernel::CacheLookup => "gati_cache_lookup",
            Kernel::CompactIndex => "gati_compact_index",
            Kernel::GatherRows => "gati_gather_rows",
            Kernel::NhwcToNchw => "gati_nhwc_to_nchw",
            Kernel::RowBiasAct => "gati_row_bias_act",
            Kernel::Pad2d => "gati_pad2d",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_in_its_module_source() {
        for k in Kernel::ALL {
            let m = k.module();
            assert!(m.kernels().contains(&k), "{k:?} not listed by {m:?}");
            let decl = format!("__global__ void {}(", k.name());
            assert!(m.source().contains(&decl), "{} does not define {}", m.file(), k.name());
        }
        for (i, m) in Module::ALL.iter().enumerate() {
            assert_eq!(m.index(), i);
            let defined = m.source().matches("__global__ void").count();
            assert_eq!(defined, m.kernels().len(), "{}: table and source disagree", m.file());
        }
    }

    #[test]
    fn the_table_lists_every_cu_file() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cu");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".cu"))
            .collect();
        files.sort();
        let mut listed: Vec<String> = Module::ALL.iter().map(|m| m.file().to_string()).collect();
        listed.sort();
        assert_eq!(files, listed);
    }
}
