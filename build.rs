//! Links libtorch so that `libtorch_cuda.so` (and through it NCCL and the CUDA runtime) loads with the
//! `butler` binary and the root package's tests.

include!("build-support/link_libtorch.rs");

fn main() {
    link_libtorch();
}
