//! Prints hearth's CRDs (the content of `deploy/crds.yaml`) without building the `hearth` binary:
//! `cargo run -p hearth-k8s --example print_crds > deploy/crds.yaml`.

fn main() {
    print!("{}", hearth_k8s::crd::crds_yaml());
}
