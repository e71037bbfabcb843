//! Server counters the embedding daemon reads (for its metrics endpoint):
//! connections, negotiated header styles and TLS, and requests refused by
//! validation, and connections the server dropped to stay within its limits
//! (connection cap, handshake and idle timeouts). Plain relaxed atomics: each counter is independent and only
//! ever grows (except `connections_active`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one [`serve`](crate::serve) instance, shared through
/// [`ServerConfig::stats`](crate::ServerConfig::stats).
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_active: AtomicU64,
    structured_sessions: AtomicU64,
    extended_sessions: AtomicU64,
    tls_sessions: AtomicU64,
    refused_requests: AtomicU64,
    refused_connections: AtomicU64,
    evicted_connections: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
}

/// A point-in-time copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub connections_accepted_total: u64,
    pub connections_active: u64,
    /// Sessions that entered transmission with structured replies.
    pub structured_sessions_total: u64,
    /// Sessions that entered transmission with extended headers.
    pub extended_sessions_total: u64,
    /// Sessions that entered transmission inside TLS.
    pub tls_sessions_total: u64,
    /// Requests answered with an error by validation (bad flags, ranges,
    /// unsupported commands), before reaching the export.
    pub refused_requests_total: u64,
    /// Connections closed at once because every slot held a session in
    /// transmission (`max_connections`).
    pub refused_connections_total: u64,
    /// Connections still in their handshake closed to make room for a new
    /// one at the connection cap.
    pub evicted_connections_total: u64,
    /// Connections dropped for not finishing the handshake in time.
    pub handshake_timeouts_total: u64,
    /// Sessions closed after the idle timeout.
    pub idle_timeouts_total: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_accepted_total: g(&self.connections_accepted),
            connections_active: g(&self.connections_active),
            structured_sessions_total: g(&self.structured_sessions),
            extended_sessions_total: g(&self.extended_sessions),
            tls_sessions_total: g(&self.tls_sessions),
            refused_requests_total: g(&self.refused_requests),
            refused_connections_total: g(&self.refused_connections),
            evicted_connections_total: g(&self.evicted_connections),
            handshake_timeouts_total: g(&self.handshake_timeouts),
            idle_timeouts_total: g(&self.idle_timeouts),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn session_mode(&self, mode: crate::proto::Mode) {
        match mode {
            crate::proto::Mode::Structured => &self.structured_sessions,
            crate::proto::Mode::Extended => &self.extended_sessions,
            crate::proto::Mode::Simple => return,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_session(&self) {
        self.tls_sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused_connection(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn evicted_connection(&self) {
        self.evicted_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake_timeout(&self) {
        self.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn idle_timeout(&self) {
        self.idle_timeouts.fetch_add(1, Ordering::Relaxed);
    }
}
