//! Notifications: `NOTIFY` inside the writing transaction, and the listener that turns them into
//! store events.

use std::time::Duration;

use tokio_postgres::Config;

use crate::pg_tls::PgTls;

use super::pool::{Fail, Tx};
use crate::StoreEvent;

/// The notification channels: `NOTIFY` is sent inside the writing transaction, so it is
/// delivered only if that transaction commits.
pub(super) const WORK_CHANNEL: &str = "airlock_work";
pub(super) const POLICY_CHANNEL: &str = "airlock_policy";
pub(super) const KEYS_CHANNEL: &str = "airlock_keys";

/// How long the listener waits before reconnecting after losing its connection.
pub(super) const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Forwards `NOTIFY` on the Airlock channels to `events` for the life of the process,
/// reconnecting whenever the connection is lost.
pub(super) async fn listen(config: Config, tls: PgTls, events: tokio::sync::broadcast::Sender<StoreEvent>) {
    use tokio_postgres::AsyncMessage;
    loop {
        if let Ok((client, mut connection)) = config.connect(tls.clone()).await {
            let forward = events.clone();
            let driver = tokio::spawn(async move {
                while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    if let AsyncMessage::Notification(n) = message {
                        let event = match n.channel() {
                            POLICY_CHANNEL => StoreEvent::Policy,
                            KEYS_CHANNEL => StoreEvent::Keys,
                            _ => StoreEvent::Work,
                        };
                        let _ = forward.send(event);
                    }
                }
            });
            let channels = format!("LISTEN {WORK_CHANNEL}; LISTEN {POLICY_CHANNEL}; LISTEN {KEYS_CHANNEL}");
            if client.batch_execute(&channels).await.is_ok() {
                // Whatever happened while this process was not listening is picked up now.
                let _ = events.send(StoreEvent::Keys);
                let _ = events.send(StoreEvent::Policy);
                let _ = events.send(StoreEvent::Work);
            }
            let _ = driver.await;
            drop(client);
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

pub(super) async fn notify(tx: &Tx<'_>, channel: &str) -> Result<(), Fail> {
    tx.execute("SELECT pg_notify($1, '')", &[&channel]).await?;
    Ok(())
}
