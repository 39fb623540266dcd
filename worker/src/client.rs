//! The worker's side of the gRPC contract: a client that sends the job token on every call, and the
//! heartbeat task that runs on the async runtime while training runs on its own thread.

use butler_proto::coordinator_client::CoordinatorClient;
use butler_proto::{HeartbeatRequest, AUTH_METADATA_KEY};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(AUTH_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

/// Upper bound on any single RPC, rendezvous's long poll included (its own deadline is
/// `cluster.rendezvous_timeout_ms`, 120 s by default).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// Connects, retrying until `wait` has passed (a coordinator may start after its workers on a
/// cluster). A failure that retrying cannot fix — a TLS problem: wrong CA, expired certificate, a
/// plaintext client against a TLS coordinator — ends it at once, with the cause named.
pub async fn connect(
    url: &str,
    token: &str,
    tls: Option<&butler_proto::transport::ClientTls>,
    wait: Duration,
) -> Result<Client, String> {
    use butler_proto::transport;
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the job token contains characters not allowed in a header".to_string())?;
    let endpoint = transport::endpoint(url, tls)?
        .tcp_nodelay(true)
        // A coordinator that vanishes without closing the connection (a killed node, a partition) is
        // noticed by HTTP/2 pings rather than by a call that waits forever; the overall request timeout
        // bounds every call, rendezvous's long poll included.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .timeout(REQUEST_TIMEOUT);
    let start = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(CoordinatorClient::with_interceptor(ch, Auth(value))),
            Err(e) => {
                if let Some(why) = transport::explain(&e, tls.is_some()) {
                    return Err(format!("cannot connect to the coordinator at {url}: {why}"));
                }
                if start.elapsed() >= wait {
                    return Err(format!(
                        "cannot reach the coordinator at {url} within {:.0}s: {}",
                        wait.as_secs_f64(),
                        transport::chain(&e)
                    ));
                }
                tracing::debug!(error = %e, "coordinator not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Progress shared between the training thread and the heartbeat task.
#[derive(Default)]
pub struct Progress {
    pub epoch: AtomicU64,
    pub step: AtomicU64,
    /// Collectives entered plus units of work completed (see `HeartbeatRequest.progress`).
    pub work: AtomicU64,
    pub stop: AtomicBool,
    pub reason: Mutex<String>,
    /// This process was asked to terminate (SIGTERM): the job stops at the next step boundary every
    /// rank agrees on, after rank 0 has committed a checkpoint.
    pub terminate: AtomicBool,
    /// The stop asked for is a regroup (see [`Progress::request_regroup`]).
    pub regroup: AtomicBool,
    /// A worker waits to join: regroup at the next step boundary every rank agrees on, after a commit.
    pub regroup_at_boundary: AtomicBool,
    /// Where the training time goes (sent with every heartbeat).
    pub timing: Arc<crate::timing::StepClock>,
}

impl Progress {
    /// One more collective entered, or unit of work done (a training step, an evaluation, an inference
    /// shard, a probe epoch).
    pub fn advanced(&self) {
        self.work.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_stop(&self, why: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A stop the job may survive: it regrouped without this rank, or the coordinator is unreachable
    /// (it may be restarting).
    pub fn request_regroup(&self, why: String) {
        self.regroup.store(true, Ordering::SeqCst);
        self.request_stop(why);
    }

    pub fn stop_reason(&self) -> Option<String> {
        self.stop.load(Ordering::SeqCst).then(|| {
            self.reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }
}

/// Sends heartbeats until the task is aborted. Asks training to stop when the coordinator says so or
/// has been unreachable for longer than `give_up`.
pub async fn heartbeat_loop(
    mut client: Client,
    rank: u32,
    generation: u64,
    period: Duration,
    give_up: Duration,
    progress: Arc<Progress>,
) {
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let req = HeartbeatRequest {
            rank,
            generation,
            epoch: progress.epoch.load(Ordering::Relaxed),
            step: progress.step.load(Ordering::Relaxed),
            progress: progress.work.load(Ordering::Relaxed),
            timing: Some(progress.timing.snapshot()),
            phase: progress.timing.phase().as_str().to_string(),
            collectives: progress.timing.collectives(),
        };
        let answer = match tokio::time::timeout(
            period.max(Duration::from_secs(1)) * 5,
            client.heartbeat(req),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded("no heartbeat answer")),
        };
        match answer {
            Ok(r) => {
                last_ok = Instant::now();
                let r = r.into_inner();
                if r.regroup_at_boundary {
                    progress.regroup_at_boundary.store(true, Ordering::SeqCst);
                }
                if r.stop && r.regroup {
                    progress.request_regroup(r.reason);
                    return;
                }
                if r.stop {
                    progress.request_stop(format!("the coordinator stopped the job: {}", r.reason));
                    return;
                }
            }
            Err(s) if last_ok.elapsed() > give_up => {
                progress.request_regroup(format!(
                    "lost the coordinator for {:.0}s: {}",
                    give_up.as_secs_f64(),
                    s.message()
                ));
                return;
            }
            Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed"),
        }
    }
}
