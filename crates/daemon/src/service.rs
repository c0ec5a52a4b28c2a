//! gRPC services: Control (builds, usage, prune) and Session (the client
//! stream). Engine errors become gRPC statuses here and only here.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_proto::control::control_server::Control;
use kiln_proto::control::*;
use kiln_proto::session::session_server::Session as SessionSvc;
use kiln_proto::session::{ClientMessage, DaemonMessage, client_message::Msg};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::engine::{Engine, EngineError};
use kiln_definition::text::{MAX_MESSAGE, bounded};

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        // Messages embed user input; an HTTP/2 trailer of megabytes would
        // reach the client as a protocol error instead of the message.
        let bound = |m: String| bounded(&m, MAX_MESSAGE).into_owned();
        match e {
            EngineError::InvalidArgument(m) => Status::invalid_argument(bound(m)),
            EngineError::Frontend(f) => Status::invalid_argument(bound(f.to_string())),
            EngineError::Build(m) => Status::failed_precondition(bound(m)),
            EngineError::Export(m) => Status::aborted(bound(format!("export failed: {m}"))),
            EngineError::Storage(m) => Status::internal(bound(m)),
            EngineError::Cancelled(why) => {
                Status::cancelled(bound(format!("the build was cancelled: {why}")))
            }
        }
    }
}

#[derive(Clone)]
pub struct ControlService(pub Arc<Engine>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn solve(&self, req: Request<SolveRequest>) -> Result<Response<SolveResponse>, Status> {
        let span = crate::trace::build_span(req.metadata(), &req.get_ref().r#ref);
        let req = req.into_inner();
        tracing::info!(r#ref = %req.r#ref, "solve");
        match self.0.solve(req).instrument(span).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::info!(error = %bounded(&e.to_string(), MAX_MESSAGE), "build failed");
                Err(e.into())
            }
        }
    }

    type StatusStream = BoxStream<StatusResponse>;

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let job = self.0.jobs.get(&req.into_inner().r#ref);
        let (history, rx) = job.subscribe();
        let live = futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(Some(m)) => return Some((m, Some(rx))),
                    Ok(None) | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return None;
                    }
                    // A slow reader misses some events rather than stalling the build.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                }
            }
        });
        let s = futures::stream::iter(history).chain(live).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }

    async fn disk_usage(
        &self,
        _: Request<DiskUsageRequest>,
    ) -> Result<Response<DiskUsageResponse>, Status> {
        Ok(Response::new(DiskUsageResponse {
            record: self.0.disk_usage()?,
        }))
    }

    type PruneStream = BoxStream<UsageRecord>;

    async fn prune(
        &self,
        req: Request<PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        let r = req.into_inner();
        let removed = self
            .0
            .prune(r.all, r.keep_storage, r.keep_duration, &r.filters)
            .await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            removed.into_iter().map(Ok),
        ))))
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let mut labels = std::collections::HashMap::new();
        let snapshotter = match self.0.snapshot_mode() {
            kiln_snapshot::Mode::Overlay => "overlayfs",
            kiln_snapshot::Mode::Native => "native",
        };
        labels.insert("org.kiln.snapshotter".to_string(), snapshotter.to_string());
        labels.insert(
            "org.kiln.executor".to_string(),
            self.0
                .config
                .oci_runtime
                .clone()
                .unwrap_or_else(|| "sandbox".into()),
        );
        labels.insert(
            "org.kiln.root".to_string(),
            self.0.root().display().to_string(),
        );
        Ok(Response::new(ListWorkersResponse {
            record: vec![WorkerRecord {
                id: "local".into(),
                labels: labels.into_iter().collect(),
                // Native first, then what registered emulators run.
                platforms: kiln_worker::emulation::runnable_platforms(std::path::Path::new(
                    kiln_worker::emulation::BINFMT_DIR,
                )),
                parallelism: self.0.config.parallelism() as i64,
            }],
        }))
    }

    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let images = self.0.list_images(&req.into_inner().filter)?;
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn remove_images(
        &self,
        req: Request<RemoveImagesRequest>,
    ) -> Result<Response<RemoveImagesResponse>, Status> {
        let (removed, freed) = self.0.remove_images(&req.into_inner().names).await?;
        Ok(Response::new(RemoveImagesResponse {
            removed,
            freed: freed as i64,
        }))
    }

    async fn tag_image(
        &self,
        req: Request<TagImageRequest>,
    ) -> Result<Response<TagImageResponse>, Status> {
        let r = req.into_inner();
        let image = self.0.tag_image(&r.source, &r.target)?;
        Ok(Response::new(TagImageResponse { image: Some(image) }))
    }

    async fn push_image(
        &self,
        req: Request<PushImageRequest>,
    ) -> Result<Response<PushImageResponse>, Status> {
        let r = req.into_inner();
        tracing::info!(name = %r.name, "push");
        let digest = self
            .0
            .push_image(&r.name, &r.target, &r.session, r.insecure)
            .await?;
        Ok(Response::new(PushImageResponse { digest }))
    }

    async fn list_history(
        &self,
        req: Request<ListHistoryRequest>,
    ) -> Result<Response<ListHistoryResponse>, Status> {
        let records = self.0.list_history(&req.into_inner().r#ref)?;
        Ok(Response::new(ListHistoryResponse { records }))
    }

    type HistoryLogsStream = BoxStream<StatusResponse>;

    async fn history_logs(
        &self,
        req: Request<HistoryLogsRequest>,
    ) -> Result<Response<Self::HistoryLogsStream>, Status> {
        let messages = self.0.history_logs(&req.into_inner().r#ref)?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            messages.into_iter().map(Ok),
        ))))
    }

    async fn remove_history(
        &self,
        req: Request<RemoveHistoryRequest>,
    ) -> Result<Response<RemoveHistoryResponse>, Status> {
        let r = req.into_inner();
        let removed = self.0.remove_history(&r.refs, r.all)?;
        Ok(Response::new(RemoveHistoryResponse { removed }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            root: self.0.root().display().to_string(),
        }))
    }
}

#[derive(Clone)]
pub struct SessionService(pub Arc<Engine>);

#[tonic::async_trait]
impl SessionSvc for SessionService {
    type AttachStream = BoxStream<DaemonMessage>;

    async fn attach(
        &self,
        req: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(ClientMessage {
                msg: Some(Msg::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("a session must start with Hello")),
        };
        if hello.session_id.is_empty() {
            return Err(Status::invalid_argument("empty session id"));
        }
        let (tx, rx) = mpsc::channel(16);
        let engine = self.0.clone();
        let session = engine.sessions.add(hello, tx);
        // The reader lives as long as the client's stream; it owns nothing else.
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(ClientMessage { msg: Some(m) })) => session.dispatch(m).await,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            engine.sessions.remove(&session.id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
