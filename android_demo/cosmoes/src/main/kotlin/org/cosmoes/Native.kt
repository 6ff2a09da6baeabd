// The JNI surface of libcosmoes_jni (src/main/cpp/cosmoes_jni.cpp): cosmoes.h one call each, sessions as handles.
package org.cosmoes

/** Receives each generated token's text (never half a UTF-8 character; may be "") and id; true stops generating. */
internal fun interface TokenCallback {
    fun onToken(piece: String, id: Int): Boolean
}

/** Thin bindings over cosmoes.h. Strings go in as UTF-8 bytes (NUL-terminated by the shim), so a prompt with
 *  characters outside the BMP reaches the library as real UTF-8, not Java's modified UTF-8. Every failure throws
 *  CosmoesException with cosmoes_last_error(). Not thread-safe per handle: CosmoesSession serialises the calls. */
internal object Native {
    init {
        // An absolute path (tests, the JVM stand-in) or the APK's jniLibs
        val path = System.getProperty("cosmoes.jni")
        if (path != null) System.load(path) else System.loadLibrary("cosmoes_jni")
    }

    external fun open(bundleDir: ByteArray, optionsJson: ByteArray): Long
    external fun generate(handle: Long, prompt: ByteArray, paramsJson: ByteArray, callback: TokenCallback)
    external fun generateIds(handle: Long, promptIds: IntArray, paramsJson: ByteArray, maxNewTokens: Int): IntArray
    external fun statsJson(handle: Long): String
    external fun reset(handle: Long)
    external fun close(handle: Long)
    external fun lastError(): String
    external fun version(): String
}
