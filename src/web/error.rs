//! What went wrong with a request, told once for both faces. A handler returns
//! `WebError<F>`: the [`Problem`] (which decides the status code) and the face `F` that renders
//! it (the dashboard an HTML page, the API OpenAI's error object). Store errors map here, in one
//! place: the database unreachable is 503 wherever it happens; a statement the database refused
//! is a 500 whose cause goes to the log, never to the client.

use std::marker::PhantomData;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// Why a request was not served.
#[derive(Debug, Clone)]
pub enum Problem {
    /// The database cannot be reached now (503): try again.
    DbDown,
    /// RabbitMQ cannot be reached now (503): try again.
    AmqpDown,
    /// No such thing, or not the asker's (404).
    NotFound(String),
    /// The asker may not do this (403).
    Forbidden(String),
    /// No key, a wrong key or a revoked key (401).
    Unauthorized(String),
    /// The request itself is wrong (400): what, which parameter, which code (OpenAI's names).
    Invalid {
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
    /// The thing is not in a state that allows this (409).
    Conflict(String),
    /// Our fault (500); the detail is logged, not shown.
    Internal(String),
}

impl Problem {
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::DbDown | Problem::AmqpDown => StatusCode::SERVICE_UNAVAILABLE,
            Problem::NotFound(_) => StatusCode::NOT_FOUND,
            Problem::Forbidden(_) => StatusCode::FORBIDDEN,
            Problem::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Problem::Invalid { .. } => StatusCode::BAD_REQUEST,
            Problem::Conflict(_) => StatusCode::CONFLICT,
            Problem::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 400 naming the parameter and OpenAI's code.
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Problem {
        Problem::Invalid {
            message: message.into(),
            param: param.map(str::to_string),
            code: code.map(str::to_string),
        }
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Problem::DbDown,
            StoreError::Rejected(m) => Problem::Internal(m),
        }
    }
}

/// How a face shows a problem.
pub trait Face {
    fn render(problem: &Problem) -> Response;
}

/// The error a handler of face `F` returns.
pub struct WebError<F: Face> {
    pub problem: Problem,
    face: PhantomData<F>,
}

impl<F: Face> WebError<F> {
    pub fn new(problem: Problem) -> Self {
        WebError {
            problem,
            face: PhantomData,
        }
    }
}

impl<F: Face> std::fmt::Debug for WebError<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.problem.fmt(f)
    }
}

impl<F: Face> From<Problem> for WebError<F> {
    fn from(p: Problem) -> Self {
        WebError::new(p)
    }
}

impl<F: Face> From<StoreError> for WebError<F> {
    fn from(e: StoreError) -> Self {
        WebError::new(e.into())
    }
}

impl<F: Face> From<sqlx::Error> for WebError<F> {
    fn from(e: sqlx::Error) -> Self {
        WebError::new(StoreError::from(e).into())
    }
}

impl<F: Face> IntoResponse for WebError<F> {
    fn into_response(self) -> Response {
        if let Problem::Internal(m) = &self.problem {
            tracing::warn!(error = %m, "request failed");
        }
        F::render(&self.problem)
    }
}
