//! Build steps beyond Cargo's:
//! - embeds libtorch's library folder as an rpath so that the built binaries find libtorch without
//!   LD_LIBRARY_PATH on the machine that built them (torch-sys reports the folder through its `links` key);
//! - compiles the small C++ shims in csrc/ against libtorch's headers (what tch does not wrap): the CPU
//!   generator state (rng.cpp) and CUDA graphs, events, pinned memory (cuda_graph.cpp). The latter also needs
//!   the CUDA runtime headers and library of the pip torch's `nvidia` wheels (site-packages/nvidia/cu13), plus
//!   `crt/host_config.h` from the `nvidia-cuda-crt` wheel that scripts/setup.sh installs. It is built and
//!   linked in every build: the pip torch brings these libraries on CPU-only machines too, where CUDA simply
//!   reports no device, so one binary runs everywhere.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report libtorch's folder");
    let lib = PathBuf::from(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=SDSTREAM_LIBTORCH_LIB={}", lib.display());
    let include = lib.parent().expect("libtorch lib folder has a parent").join("include");
    let cuda = cuda_folder(&lib);
    let cuda_include = cuda.join("include");
    let cuda_lib = cuda.join("lib");
    for (path, what) in [
        (include.join("ATen/cuda/CUDAGraph.h"), "libtorch's CUDA headers"),
        (cuda_include.join("cuda_runtime_api.h"), "the CUDA runtime headers (pip wheel nvidia-cuda-runtime)"),
        (cuda_include.join("crt/host_config.h"), "crt/host_config.h (pip wheel nvidia-cuda-crt==13.0.*)"),
        (cuda_lib.join("libcudart.so.13"), "the CUDA runtime library libcudart.so.13"),
    ] {
        if !path.exists() {
            eprintln!(
                "sdstream build: {what} not found at {}.\nThe CUDA graph shim (csrc/cuda_graph.cpp) is built \
                 against the pip torch and its nvidia wheels. Run `. scripts/setup.sh` (it installs torch 2.11.0 \
                 and nvidia-cuda-crt into its virtual environment and exports what the build needs), then build \
                 again.",
                path.display()
            );
            std::process::exit(1);
        }
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/rng.cpp")
        .file("csrc/cuda_graph.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda_include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        // libtorch's CachingHostAllocator.h aligns by std::hardware_destructive_interference_size; GCC warns
        // at every use. The shim only calls its virtual methods, so the value does not matter here.
        .flag_if_supported("-Wno-interference-size")
        .warnings(false)
        .compile("sdstream_shim");
    // After the shim, so that the linker (with --as-needed) sees the shim's references first.
    println!("cargo:rustc-link-search=native={}", cuda_lib.display());
    for name in ["torch_cuda", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
    // Only the versioned file exists in the wheel (no libcudart.so development symlink).
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
}

/// site-packages/nvidia/cu13 beside site-packages/torch (libtorch's lib folder is site-packages/torch/lib).
fn cuda_folder(torch_lib: &Path) -> PathBuf {
    torch_lib.parent().and_then(Path::parent).map(|site| site.join("nvidia/cu13")).unwrap_or_default()
}
