//! The terminal while the password prompt has its echo off, shared with the
//! interrupt handler: it restores exactly what the prompt changed, and no
//! prompt turns echo off after it.

use std::io::{self, BufRead, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::termios::{LocalModes, OptionalActions, Termios, tcgetattr, tcsetattr};

enum State {
    Idle,
    /// A prompt has echo off; the settings it found.
    Hidden(Termios),
    /// Interrupted: no prompt may start.
    Closed,
}

static STATE: Mutex<State> = Mutex::new(State::Idle);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks on the terminal for a line it does not echo. Echo goes off before
/// the prompt is shown, so whoever sees the prompt (and presses Ctrl-C at
/// it) never races the switch.
pub fn prompt_hidden(prompt: &str) -> io::Result<String> {
    let stdin = io::stdin();
    {
        let mut st = state();
        if matches!(*st, State::Closed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        let saved = tcgetattr(&stdin)?;
        let mut hidden = saved.clone();
        hidden.local_modes.remove(LocalModes::ECHO);
        // The Enter that ends the line is still shown.
        hidden.local_modes.insert(LocalModes::ECHONL);
        tcsetattr(&stdin, OptionalActions::Now, &hidden)?;
        *st = State::Hidden(saved);
    }
    let mut line = String::new();
    // Shown on the terminal even when stderr goes to a file.
    let shown = match std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        Ok(mut tty) => write!(tty, "{prompt}").and_then(|()| tty.flush()),
        Err(_) => write!(io::stderr(), "{prompt}").and_then(|()| io::stderr().flush()),
    };
    let read = shown.and_then(|()| stdin.lock().read_line(&mut line));
    let restored = {
        let mut st = state();
        match std::mem::replace(&mut *st, State::Idle) {
            State::Hidden(saved) => tcsetattr(&stdin, OptionalActions::Now, &saved),
            // Restored by the interrupt already.
            State::Closed => {
                *st = State::Closed;
                Ok(())
            }
            State::Idle => Ok(()),
        }
    };
    read?;
    restored?;
    // Ctrl-D: the input ended without a line.
    let Some(line) = line.strip_suffix('\n') else {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the input ended"));
    };
    Ok(line.strip_suffix('\r').unwrap_or(line).to_string())
}

/// For an interrupted process: gives the terminal back as a prompt found
/// it, and starts no prompt after.
pub fn close() {
    let mut st = state();
    if let State::Hidden(saved) = std::mem::replace(&mut *st, State::Closed) {
        let _ = tcsetattr(io::stdin(), OptionalActions::Now, &saved);
    }
}
