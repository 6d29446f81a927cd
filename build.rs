//! Build steps beyond Cargo's:
//! - embeds libtorch's library folder as an rpath so that the built binaries find libtorch without
//!   LD_LIBRARY_PATH on the machine that built them (torch-sys reports the folder through its `links` key);
//! - compiles the small C++ shim in csrc/ against libtorch's headers (what tch does not wrap).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report libtorch's folder");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=SDSTREAM_LIBTORCH_LIB={lib}");
    let include = PathBuf::from(&lib).parent().expect("libtorch lib folder has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/rng.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("sdstream_shim");
}
