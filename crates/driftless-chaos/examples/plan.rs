//! Prints the plan of a seed:
//! `cargo run -p driftless-chaos --example plan -- SEED [NODES] [MS] [POSTGRES_NODES]`.
fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).expect("SEED");
    let nodes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(6_000);
    let postgres: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    print!(
        "{}",
        driftless_chaos::Plan::generate_with_postgres(seed, nodes, ms, true, postgres).describe()
    );
}
