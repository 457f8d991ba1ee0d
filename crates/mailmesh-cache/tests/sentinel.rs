//! Redis Sentinel: the cache finds the master through a sentinel and follows a
//! failover. Real redis-server processes on loopback (a master, its replica and one
//! sentinel in Redis's own sentinel mode), started by the test.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mailmesh_cache::Cache;
use mailmesh_cache::redis::{RedisCache, RedisConfig, SentinelConfig};
use mailmesh_kit::Secret;
use mailmesh_testkit::free_port;

/// A redis-server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[String]) -> Server {
    Server(
        Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server, installed by scripts/backends.sh)"),
    )
}

fn redis(port: u16, dir: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    start(&args)
}

/// One command to a server or sentinel; its reply as text lines.
fn ask(port: u16, args: &[&str]) -> redis::RedisResult<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    args[1..].iter().for_each(|a| {
        cmd.arg(*a);
    });
    let value: redis::Value = cmd.query(&mut conn)?;
    Ok(format!("{value:?}"))
}

async fn until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_a_sentinel_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r, s) = (free_port(), free_port(), free_port());
    let _master = redis(m, dir.path(), &[]);
    let replica_dir = dir.path().join("replica");
    std::fs::create_dir(&replica_dir).unwrap();
    let _replica = redis(
        r,
        &replica_dir,
        &["--replicaof", "127.0.0.1", &m.to_string()],
    );
    until("the replica in sync", 30, || {
        ask(r, &["INFO", "replication"]).is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "bind 127.0.0.1\nport {s}\ndir {}\nsentinel monitor mm 127.0.0.1 {m} 1\n\
             sentinel down-after-milliseconds mm 1000\nsentinel failover-timeout mm 5000\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let _sentinel = start(&[conf.display().to_string(), "--sentinel".into()]);
    // A sentinel learns of replicas from the master's INFO, every 10 s.
    until("the sentinel knowing the replica", 40, || {
        ask(s, &["SENTINEL", "REPLICAS", "mm"]).is_ok_and(|v| v.contains(&r.to_string()))
    })
    .await;

    let cache = RedisCache::connect(&RedisConfig {
        // Only the password, database and scheme of this URL count with a sentinel.
        url: Secret::new("redis://127.0.0.1:1/0".into()),
        key_prefix: "t:".into(),
        command_timeout: Duration::from_secs(2),
        sentinel: Some(SentinelConfig {
            master: "mm".into(),
            nodes: vec![Secret::new(format!("redis://127.0.0.1:{s}"))],
        }),
    })
    .await
    .expect("the master from the sentinel");
    cache
        .set("k", Bytes::from_static(b"before"), None)
        .await
        .unwrap();
    assert!(ask(m, &["GET", "t:k"]).unwrap().contains("before"));

    ask(s, &["SENTINEL", "FAILOVER", "mm"]).unwrap();
    until("the replica promoted", 30, || {
        ask(r, &["ROLE"]).is_ok_and(|v| v.contains("master"))
            && ask(m, &["ROLE"]).is_ok_and(|v| v.contains("slave"))
    })
    .await;
    // Writes fail (READONLY on the demoted master) until the cache has asked the
    // sentinel again; then they go to the new master.
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cache.set("k2", Bytes::from_static(b"after"), None).await {
            Ok(()) if ask(r, &["GET", "t:k2"]).is_ok_and(|v| v.contains("after")) => break,
            Ok(()) => {}
            Err(_) => failed += 1,
        }
        assert!(
            Instant::now() < deadline,
            "writes never reached the new master"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cache.get("k").await.unwrap().unwrap(), "before");
    assert_eq!(
        cache.incr("n", 2, Duration::from_secs(60)).await.unwrap(),
        2
    );
    assert!(ask(r, &["GET", "t:n"]).unwrap().contains('2'));
    eprintln!("{failed} write(s) failed during the failover");
}
