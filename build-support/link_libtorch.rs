// Included by the build scripts of every package with binaries or tests that may touch CUDA (the root
// package and butler-worker): `rustc-link-arg` reaches only the emitting package's own targets.
//
// rustc links with `--as-needed`, and Rust code references no symbol of `libtorch_cuda.so`, so without
// `--no-as-needed` the CUDA half of libtorch is dropped and `tch::Cuda::is_available()` is false even on a
// GPU machine (tch #177, #907). The RUNPATH finds the venv's libtorch and the `libnccl.so` link
// scripts/setup-python.sh makes (the wheel ships only `libnccl.so.2`, cudarc loads `libnccl.so`);
// LD_LIBRARY_PATH, searched first, points elsewhere where the venv differs (a GPU machine).

/// Emits the link arguments; returns libtorch's lib directory.
fn link_libtorch() -> String {
    // Set by torch-sys (`links = "tch"`) for its direct dependents.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    if let Ok(venv) = std::env::var("BUTLER_VENV") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={venv}/nccl-shim");
    }
    println!("cargo:rerun-if-env-changed=BUTLER_VENV");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    lib
}
