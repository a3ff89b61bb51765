//! What the host tells its datacenter and its local API about each service: a
//! [`HostStatus`] on the status subject after every outcome, and every service again
//! now and then so that the status stream knows the host even when nothing changes.
//! Each report carries the service's last [`Health`], so that the last report of a host
//! is enough to judge it.

use confcast_schemas::message::{now_ms, Health};
use confcast_schemas::{encode, subject, HostStatus, ServiceId, WIRE_VERSION};

use crate::host::Host;

impl Host {
    /// Reports every followed service as it stands.
    pub(crate) async fn report_all(&self) {
        for id in &self.services {
            let last = self.live.service(&id.to_string()).unwrap_or_default();
            self.report(id, self.state(id).commit, last.error, last.exec_status).await;
        }
    }

    /// Reports where `id` stands: the commit in place, what went wrong (`None`: all
    /// went well) and the last exit status of `--exec`, with its health as last judged;
    /// the local API learns it too.
    pub(crate) async fn report(
        &self,
        id: &ServiceId,
        commit: Option<String>,
        error: Option<String>,
        exec_status: Option<i32>,
    ) {
        self.report_judged(id, commit, error, exec_status, None).await;
    }

    /// [`Host::report`], with the service's health judged anew (`None`: as last judged).
    pub(crate) async fn report_judged(
        &self,
        id: &ServiceId,
        commit: Option<String>,
        error: Option<String>,
        exec_status: Option<i32>,
        judged: Option<Health>,
    ) {
        let mut health = None;
        self.live.update(id, |live| {
            live.error = error.clone();
            if exec_status.is_some() {
                live.exec_status = exec_status;
            }
            if judged.is_some() {
                live.health = judged;
            }
            health = live.health.clone();
        });
        let status = HostStatus {
            v: WIRE_VERSION,
            dc: self.config.dc.clone(),
            host: self.config.host_id.clone(),
            kind: id.kind,
            name: id.name.clone(),
            commit,
            ok: error.is_none(),
            error,
            exec_status,
            at_ms: now_ms(),
            health,
        };
        let subject = subject::status_subject(&self.config.dc, &self.config.host_id, id.kind, &id.name);
        if let Err(e) = self.client.publish(subject, encode(&status).into()).await {
            tracing::debug!(error = %e, "status not published");
        }
    }
}
