//! TCP echo (`ktb.test/tcp-echo:dev`, port 9000): every byte received on a
//! connection is sent back on it, until the peer closes its side.

use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind(ktb_workloads::listen_addr(9000)).await?;
    eprintln!(
        "tcp-echo on {} in pod {}",
        listener.local_addr()?,
        ktb_workloads::pod_name()
    );
    let serve = async {
        loop {
            let (mut conn, _) = listener.accept().await?;
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.split();
                // Errors only mean the peer went away; nothing to report.
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    };
    tokio::select! {
        r = serve => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}
