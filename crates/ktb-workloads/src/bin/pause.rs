//! The pod sandbox process (`ktb.test/pause:dev`): holds the pod's
//! namespaces open and does nothing else until told to stop, like the
//! upstream pause image, which is not available without a registry.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    ktb_workloads::shutdown_signal().await;
}
