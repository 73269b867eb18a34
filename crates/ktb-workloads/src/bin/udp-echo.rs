//! UDP echo (`ktb.test/udp-echo:dev`, port 9001): every datagram is sent
//! back, unchanged, to the address it came from.

use tokio::net::UdpSocket;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let socket = UdpSocket::bind(ktb_workloads::listen_addr(9001)).await?;
    eprintln!(
        "udp-echo on {} in pod {}",
        socket.local_addr()?,
        ktb_workloads::pod_name()
    );
    let serve = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, peer) = socket.recv_from(&mut buf).await?;
            socket.send_to(&buf[..n], peer).await?;
        }
    };
    tokio::select! {
        r = serve => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}
