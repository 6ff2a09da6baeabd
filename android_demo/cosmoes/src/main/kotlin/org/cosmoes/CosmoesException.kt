// The one exception the library module throws: the C library's one-line message and its cosmoes_status.
package org.cosmoes

/** A failure of the native library: [message] is cosmoes_last_error()'s one line, [status] the cosmoes_status
 *  (1 invalid argument, 2 bad bundle, 3 too long, 4 runtime error, 5 closed). */
class CosmoesException(message: String, val status: Int) : Exception(message) {
    companion object {
        const val INVALID_ARGUMENT = 1
        const val BAD_BUNDLE = 2
        const val TOO_LONG = 3
        const val RUNTIME_ERROR = 4
        const val CLOSED = 5
    }
}
