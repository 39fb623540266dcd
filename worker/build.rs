//! Links libtorch so that CUDA is usable (see build-support/link_libtorch.rs), and compiles the small C++
//! shim tch lacks (bf16 autocast, csrc/precision.cpp) against the same libtorch's headers.

include!("../build-support/link_libtorch.rs");

fn main() {
    let lib = link_libtorch();
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch's lib directory has a parent")
        .to_path_buf();
    println!("cargo:rerun-if-changed=csrc/precision.cpp");
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
        .file("csrc/precision.cpp")
        .compile("butler_precision");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
