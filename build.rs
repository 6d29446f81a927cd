//! Embeds libtorch's library folder as an rpath so that the built binaries find libtorch without
//! LD_LIBRARY_PATH on the machine that built them. torch-sys reports the folder through its `links` key.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=SDSTREAM_LIBTORCH_LIB={dir}");
    }
}
