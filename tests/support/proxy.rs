//! A TCP proxy between the CLI and the agent that the test can cut, to
//! simulate the tunnel's connection dying (a port-forward dropping, a laptop
//! changing networks).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// One proxied connection: the task pumping it, and duplicates of both
/// sockets' descriptors so `cut` can turn their close into a reset.
struct Link {
    pump: AbortHandle,
    sockets: [std::net::TcpStream; 2],
}

pub struct CuttableProxy {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<Link>>>,
    task: JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let registry = Arc::clone(&links);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let (Ok(client), Ok(upstream)) = (duplicated(client), duplicated(upstream)) else {
                    continue;
                };
                let ((mut client, client_dup), (mut upstream, upstream_dup)) = (client, upstream);
                let pump = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                registry.lock().unwrap().push(Link {
                    pump: pump.abort_handle(),
                    sockets: [client_dup, upstream_dup],
                });
            }
        });
        CuttableProxy { addr, links, task }
    }

    /// Resets every connection through the proxy, both sides.
    pub fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            for socket in &link.sockets {
                let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
            link.pump.abort();
        }
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

fn duplicated(tcp: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    tcp.set_nodelay(true)?;
    let std = tcp.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}
