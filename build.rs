//! Links libtorch with `--no-as-needed` so that `libtorch_cuda.so` (and through it NCCL and the CUDA
//! runtime) loads with the `butler` binary and the root package's tests; see worker/build.rs for why
//! each package needs its own.

fn main() {
    let lib =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    if let Ok(venv) = std::env::var("BUTLER_VENV") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={venv}/nccl-shim");
    }
    println!("cargo:rerun-if-env-changed=BUTLER_VENV");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
