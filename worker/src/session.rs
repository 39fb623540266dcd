//! A worker's session with the coordinator for one generation: the async runtime that carries RPCs,
//! the client, this rank's identity and the heartbeat's view of the job. The drivers and the shared
//! training pieces (`job.rs`) read it; only `process.rs` creates it.

use crate::client::{Client, Progress};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) struct Ctx<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) client: Client,
    pub(crate) rank: u32,
    pub(crate) world: u32,
    pub(crate) generation: u64,
    pub(crate) progress: Arc<Progress>,
    pub(crate) run_dir: PathBuf,
    /// The worker's index among the workers of its host (picks its GPU).
    pub(crate) local_rank: usize,
    /// The commit point the job resumes from, if the coordinator named one.
    pub(crate) resume: Option<butler_proto::ResumePoint>,
}

impl Ctx<'_> {
    pub(crate) fn check_stop(&self) -> Result<()> {
        match self.progress.stop_reason() {
            Some(why)
                if self
                    .progress
                    .regroup
                    .load(std::sync::atomic::Ordering::SeqCst) =>
            {
                Err(Error::Regroup(why))
            }
            Some(why) => Err(Error::Stopped(why)),
            None => Ok(()),
        }
    }
}
