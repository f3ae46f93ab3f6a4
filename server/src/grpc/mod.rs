//! The gRPC services, one module each, and how callers are identified.

pub mod agent;
pub mod auth;
pub mod enrollment;
pub mod management;

/// The one place a core error becomes a gRPC status.
impl From<crate::error::CoreError> for tonic::Status {
    fn from(e: crate::error::CoreError) -> Self {
        use crate::error::CoreError as E;
        let msg = e.message();
        match e {
            E::Invalid(_) => tonic::Status::invalid_argument(msg),
            E::NotFound(_) => tonic::Status::not_found(msg),
            E::Refused(_) => tonic::Status::failed_precondition(msg),
            E::Unavailable(_) => tonic::Status::unavailable(msg),
            E::Denied(_) => tonic::Status::permission_denied(msg),
            E::Aborted(_) => tonic::Status::aborted(msg),
            E::Repo { .. } | E::State { .. } => tonic::Status::internal(msg),
        }
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// The job now, then each change, ending with its final state.
pub(crate) fn watch_stream(
    shared: &crate::server::Shared,
    id: &str,
) -> Result<BoxStream<backer_proto::v1::Job>, tonic::Status> {
    let rx = shared
        .jobs
        .watch(id)
        .ok_or_else(|| tonic::Status::not_found(format!("no job {id}")))?;
    let stream = futures::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
        // Waits for a change (after the first value); a closed channel with
        // nothing new means the job's last state was already sent.
        if done || (!first && rx.changed().await.is_err()) {
            return None;
        }
        let job = rx.borrow_and_update().clone();
        let last = job.state.is_final();
        Some((Ok(job.to_proto()), (rx, false, last)))
    });
    Ok(Box::pin(stream))
}
