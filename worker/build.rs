//! Links libtorch so that CUDA is usable, and compiles the small C++ shim tch lacks.
//!
//! rustc links with `--as-needed`, and Rust code references no symbol of `libtorch_cuda.so`, so without
//! `--no-as-needed` the CUDA half of libtorch is dropped from every binary and `tch::Cuda::is_available()`
//! is false even on a GPU machine (tch #177, #907). `rustc-link-arg` reaches only this package's own
//! targets (its tests, benches, examples), so every package with a binary or test that may touch CUDA has
//! such a build script; the root package's does the same for the `butler` binary.

fn main() {
    // Set by torch-sys (`links = "tch"`) for its direct dependents.
    let lib =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    if let Ok(venv) = std::env::var("BUTLER_VENV") {
        // The `libnccl.so` name cudarc looks for (the wheel ships only `libnccl.so.2`); see
        // scripts/setup-python.sh. Found through RUNPATH, or LD_LIBRARY_PATH where the venv differs.
        println!("cargo:rustc-link-arg=-Wl,-rpath={venv}/nccl-shim");
    }
    println!("cargo:rerun-if-env-changed=BUTLER_VENV");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");

    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch's lib directory has a parent")
        .to_path_buf();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        // PyTorch wheels are built with the C++11 ABI only since 2.7.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/autocast.cpp")
        .compile("butler_autocast");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
