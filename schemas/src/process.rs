//! Running as a service: readiness for systemd, shutdown on signals. Shared by the
//! long-running binaries (`relay`, `subscriber`).

use tokio_util::sync::CancellationToken;

/// Tells systemd about the service's state (`READY=1`, ...) on the datagram socket it
/// names in `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); nothing
/// when not run by systemd with `Type=notify`.
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = UnixDatagram::unbound().and_then(|socket| socket.send_to_addr(state.as_bytes(), &addr?));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Cancels `token` on SIGTERM or ctrl-c.
pub async fn shutdown_on_signals(token: CancellationToken) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}
