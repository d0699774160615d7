//! Connection-level guards against hostile network neighbours, with real sockets and bounded waits: a request
//! head that never completes, one that trickles in, idle keep-alive connections, and more connections than
//! `server.max_connections`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::app::TestApp;
use crate::support::fake_openai::FakeOpenAi;

/// How long a test waits for the gateway to close a connection before calling it open (far beyond the
/// configured timeouts, so a slow machine does not fail the test; a gateway that never closes still does).
const PATIENCE: Duration = Duration::from_secs(15);

/// Whether the peer closed `stream` (EOF or reset) within `within`, reading and discarding whatever it sends.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn host(app: &TestApp) -> String {
    app.root.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.header_read_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream
        .write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/js")
        .await
        .unwrap();
    assert!(closed_within(&mut stream, PATIENCE).await, "a head that never ends keeps its connection open");

    // A connection that sends nothing at all (not even enough to tell HTTP/1.1 from HTTP/2) is closed too.
    let mut silent = TcpStream::connect(host(&app)).await.unwrap();
    silent.write_all(b"GE").await.unwrap();
    assert!(closed_within(&mut silent, PATIENCE).await, "a silent connection stays open");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_request_head_trickled_byte_by_byte_is_closed_after_the_header_read_timeout() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.header_read_timeout = Duration::from_secs(1)).await;
    let stream = TcpStream::connect(host(&app)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // One byte every 100 ms, for longer than PATIENCE: each byte is "activity", the head is never whole.
    let trickler = tokio::spawn(async move {
        let head =
            b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Padding: ".iter().copied().chain(std::iter::repeat(b'a'));
        for byte in head.take(200) {
            if write.write_all(&[byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let mut buf = [0u8; 1024];
    let closed = matches!(tokio::time::timeout(PATIENCE, read.read(&mut buf)).await, Ok(Ok(0) | Err(_)));
    trickler.abort();
    assert!(closed, "a trickling head keeps its connection open");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.server.idle_timeout = Duration::from_secs(1);
        s.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(closed_within(&mut stream, PATIENCE).await, "an idle keep-alive connection stays open");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_served_again_when_others_close() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.server.max_connections = 3;
        s.server.header_read_timeout = Duration::from_secs(120);
        s.server.idle_timeout = Duration::from_secs(120);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(host(&app)).await.unwrap());
    }
    // The held connections are accepted in order; the next one is over the cap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(host(&app)).await.unwrap();
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n").await;
    let mut buf = vec![0u8; 1024];
    let answer = tokio::time::timeout(PATIENCE, over.read(&mut buf)).await.expect("closed, not left waiting");
    assert!(matches!(answer, Ok(0) | Err(_)), "a connection over the cap was served: {answer:?}");

    // A held connection still works, and once they close, new connections are served again.
    held[0].write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(PATIENCE, held[0].read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(held);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ok = app.client.get(format!("{}/healthz", app.root)).send().await.is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no connection served after the held ones closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn http2_by_prior_knowledge_and_http1_whose_first_byte_arrives_alone_are_both_served() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    // The whole HTTP/2 preface in the first bytes: HTTP/2.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(format!("{}/healthz", app.root)).send().await.unwrap();
    assert_eq!((response.version(), response.status().as_u16()), (reqwest::Version::HTTP_2, 200));

    // "P" alone may begin the preface or "POST": the protocol is told from the bytes that follow.
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(
            b"OST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n\
              Content-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "no key, so 401: {answer}");
}
