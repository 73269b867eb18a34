//! ktb, the kube traffic bridge: the developer's side of the tunnel.
//!
//! This library holds everything the `ktb` binary does, so tests can drive
//! it in-process: [`tunnel`] keeps a tunnel to an agent up (handshake,
//! reconnect with backoff), [`expose`] carries the streams the agent sends
//! to the developer's local processes, [`exchange`] moves a Service's
//! callers to this machine, [`connect`] puts this machine into the
//! cluster's network (TUN or SOCKS5, DNS, routes, with a journal of every
//! local change), both on the [`session`] layer (the Lease, the agent pod,
//! renewals, ending), and [`report`] is how they tell the person at the
//! terminal what is happening, [`refusal`] why a command refused to act;
//! [`recover`], [`clean`] and [`status`] work on any session from any
//! machine, [`permissions`] lists what each command may do in a namespace,
//! and [`doctor`] checks all of that ahead of time; [`agent_image`] writes
//! the agent image for clusters that cannot pull it. The binary only parses
//! flags and prints.

pub mod agent_http;
pub mod agent_image;
pub mod clean;
pub mod cluster;
pub mod connect;
pub mod doctor;
pub mod exchange;
pub mod expose;
pub mod forward;
pub mod mesh;
pub mod permissions;
pub mod pinned_tls;
pub mod portforward;
pub mod preflight;
pub mod preview;
pub mod proof;
pub mod recover;
pub mod refusal;
pub mod report;
pub mod service_ports;
pub mod session;
pub mod status;
pub mod target;
pub mod tunnel;
