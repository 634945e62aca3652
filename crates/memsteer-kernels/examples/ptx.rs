//! Prints the PTX of every kernel for one architecture (default `compute_90`), as NVRTC compiles it
//! at run time: `cargo run -p memsteer-kernels --features cuda --example ptx -- compute_80 > k.ptx`,
//! then `ptxas -v --gpu-name sm_80 k.ptx` shows each kernel's registers, spills and shared memory.
//! Needs the NVRTC library on the library path (see `.ci/run`), not a GPU.

fn main() {
    let arch = std::env::args().nth(1).unwrap_or_else(|| "compute_90".into());
    match memsteer_kernels::cuda::compile(&arch) {
        Ok(ptx) => print!("{ptx}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
