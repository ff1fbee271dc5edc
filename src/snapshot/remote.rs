//! Snapshots in an S3-compatible object store: `s3://BUCKET/PREFIX` holds the same
//! files as a snapshot directory, one object each (`PREFIX/snapshot.json`, ...).
//!
//! The client is `object_store` (Apache Arrow's, well kept and used by many): it signs
//! requests, retries with backoff within a bounded time, and bounds every request by a
//! timeout, so a store that stops answering turns into an error, never a hang. It is
//! async; the page server is a plain thread, so each request is run to completion on
//! a small runtime of this module's own (`block_on`).
//!
//! Where: `AWS_ENDPOINT_URL` (or `--endpoint`), `AWS_REGION` (default `us-east-1`),
//! `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; without keys, requests go unsigned.
//! No message ever prints a key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`; `None` when `s` is not an `s3://` address.
    pub fn parse(s: &str) -> Option<std::result::Result<S3Url, BadS3Url>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Some(Err(BadS3Url::Bucket(s.into())));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Some(Err(BadS3Url::Prefix(s.into())));
        }
        Some(Ok(S3Url { bucket: bucket.into(), prefix: prefix.into() }))
    }

    /// The key of file `name` of the snapshot.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) }
    }
}

/// A failure of the store's client (`object_store`). Its message holds its causes
/// already (each of object_store's errors writes its cause into its own message), so it
/// hands none out: [`crate::error::Report`] would print them twice.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub Box<object_store::Error>);

/// Why an `s3://` address is not one a snapshot can live at.
#[derive(Debug, thiserror::Error)]
pub enum BadS3Url {
    #[error("{0:?}: the bucket name must be 3 to 63 characters of a-z, 0-9, '-' and '.'")]
    Bucket(String),
    #[error("{0:?}: the prefix has an empty, '.' or '..' part")]
    Prefix(String),
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How the store is reached.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    access_key: Option<String>,
    secret_key: Option<String>,
    /// How long one request may take, and all retries of it.
    pub request_timeout: Duration,
    pub retry_timeout: Duration,
}

impl S3Config {
    /// From the environment (see the module documentation); `endpoint` overrides
    /// `AWS_ENDPOINT_URL`.
    pub fn from_env(endpoint: Option<String>) -> S3Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let secs = |k: &str, d: u64| var(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        S3Config {
            endpoint: endpoint.or_else(|| var("AWS_ENDPOINT_URL_S3")).or_else(|| var("AWS_ENDPOINT_URL")),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
            request_timeout: Duration::from_secs(secs("VMFORK_S3_TIMEOUT_SECS", 10)),
            retry_timeout: Duration::from_secs(secs("VMFORK_S3_RETRY_SECS", 20)),
        }
    }
}

/// What the client did, for `vmfork snapshot inspect` and the benchmarks.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// [`Counters`] as numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RemoteReport {
    pub location: String,
    pub requests: u64,
    pub bytes_fetched: u64,
    pub pack_cache_hits: u64,
}

/// One snapshot's prefix in a bucket.
#[derive(Debug)]
pub struct Remote {
    pub url: S3Url,
    store: AmazonS3,
    pub counters: Counters,
    /// Where requests go, for messages (no credentials in it).
    endpoint: String,
    /// How it was set up: another prefix of the same store is reached the same way.
    cfg: S3Config,
}

/// The runtime every request of this process runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmfork-s3")
            .enable_all()
            .build()
            .expect("a tokio runtime starts")
    })
}

impl Remote {
    pub fn new(url: S3Url, cfg: &S3Config) -> Result<Remote> {
        let endpoint =
            cfg.endpoint.clone().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&cfg.region)
            .with_endpoint(&endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(cfg.request_timeout)
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_allow_http(endpoint.starts_with("http://")),
            )
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: cfg.retry_timeout,
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
            });
        match (&cfg.access_key, &cfg.secret_key) {
            (Some(k), Some(s)) => b = b.with_access_key_id(k).with_secret_access_key(s),
            _ => b = b.with_skip_signature(true),
        }
        let store = b.build().map_err(|source| Error::Client {
            url: url.to_string(),
            endpoint: endpoint.clone(),
            source: ClientError(Box::new(source)),
        })?;
        Ok(Remote { url, store, counters: Counters::default(), endpoint, cfg: cfg.clone() })
    }

    /// Another snapshot's prefix, in the same store and reached the same way (a parent).
    pub fn sibling(&self, url: S3Url) -> Result<Remote> {
        Remote::new(url, &self.cfg)
    }

    fn err(&self, name: &str, e: object_store::Error) -> Error {
        let object = self.object(name);
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound { object },
            object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. } => {
                Error::Denied { object }
            }
            e => Error::Request { object, endpoint: self.endpoint.clone(), source: ClientError(Box::new(e)) },
        }
    }

    /// Object `name` of the snapshot, as messages name it: `s3://BUCKET/KEY`.
    pub fn object(&self, name: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, self.url.key(name))
    }

    /// The object `name` of the snapshot, or `None` where there is none.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = ObjectPath::from(self.url.key(name));
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let got = runtime().block_on(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => {
                self.counters.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Stores `data` as object `name`; with `create`, fails where it exists already.
    pub fn put(&self, name: &str, data: Vec<u8>, create: bool) -> Result<()> {
        let path = ObjectPath::from(self.url.key(name));
        let opts = PutOptions {
            mode: if create { PutMode::Create } else { PutMode::Overwrite },
            ..Default::default()
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        runtime()
            .block_on(self.store.put_opts(&path, PutPayload::from(data), opts))
            .map(|_| ())
            .map_err(|e| self.err(name, e))
    }

    /// Removes object `name` (tests and tools; a restore never calls it).
    pub fn delete(&self, name: &str) -> Result<()> {
        let path = ObjectPath::from(self.url.key(name));
        runtime().block_on(self.store.delete(&path)).map_err(|e| self.err(name, e))
    }

    pub fn report(&self) -> RemoteReport {
        RemoteReport {
            location: self.url.to_string(),
            requests: self.counters.requests.load(Ordering::Relaxed),
            bytes_fetched: self.counters.bytes.load(Ordering::Relaxed),
            pack_cache_hits: self.counters.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// A name for this store's objects in the host's pack cache.
    pub fn cache_scope(&self) -> String {
        format!("{}|{}|{}", self.endpoint, self.url.bucket, self.url.prefix)
    }
}

/// Uploads the snapshot in directory `dir` to `remote`: packs, state and working set
/// first, then the index, and the manifest last, so an interrupted upload leaves no
/// snapshot a restore would take for whole. Refuses a prefix that holds one already.
pub fn push(dir: &std::path::Path, remote: &Remote) -> Result<u64> {
    let snap = super::Snapshot::open(dir)?;
    // A snapshot in a store is read by hosts that do not have this one's directories.
    if let Some(p) = snap.manifest.parents.iter().find(|p| !p.location.starts_with("s3://")) {
        return Err(Error::LocalParentPushed { location: p.location.clone(), dir: dir.to_path_buf() });
    }
    if remote.get("snapshot.json")?.is_some() {
        return Err(Error::Pushed { object: remote.object("snapshot.json") });
    }
    let mut names: Vec<String> =
        (0..snap.manifest.packs.len()).map(super::format::Manifest::pack_name).collect();
    names.push("state.json".into());
    if snap.working_set.is_some() {
        names.push("ws.bin".into());
    }
    if dir.join("hashes.bin").exists() {
        names.push("hashes.bin".into());
    }
    names.push("index.bin".into());
    names.push("snapshot.json".into());
    let mut total = 0;
    for name in names {
        let path = dir.join(&name);
        let data = std::fs::read(&path).map_err(super::io_err(&path))?;
        total += data.len() as u64;
        remote.put(&name, data, name == "snapshot.json")?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_addresses_parse_or_say_why_not() {
        let u = S3Url::parse("s3://snaps/fleet/vm1/").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("snaps", "fleet/vm1"));
        assert_eq!(u.key("index.bin"), "fleet/vm1/index.bin");
        assert_eq!(S3Url::parse("s3://snaps").unwrap().unwrap().key("x"), "x");
        assert!(S3Url::parse("/tmp/snap").is_none());
        for bad in ["s3://", "s3://A_b/x", "s3://ok-bucket/a/../b", "s3://ok-bucket/a//b"] {
            assert!(S3Url::parse(bad).unwrap().is_err(), "{bad} accepted");
        }
    }
}
