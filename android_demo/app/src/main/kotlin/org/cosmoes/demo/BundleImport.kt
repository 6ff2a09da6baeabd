// Copying a bundle folder picked with the system file picker (ACTION_OPEN_DOCUMENT_TREE) into the app's storage:
// the library opens bundles by path, and a document tree is only reachable through its content URIs.
package org.cosmoes.demo

import android.content.Context
import android.net.Uri
import androidx.documentfile.provider.DocumentFile
import java.io.File
import java.io.IOException

/** Copies the picked tree into [root]/<folder name> (replacing an earlier copy) and returns that directory. The copy
 *  is made beside it first and renamed into place, so a failed copy never leaves a half bundle behind. Blocking:
 *  call it on Dispatchers.IO. Throws IOException with one line for a folder that is not a bundle or cannot be read. */
fun importBundle(context: Context, tree: Uri, root: File): File {
    val source = DocumentFile.fromTreeUri(context, tree) ?: throw IOException("cannot open the picked folder")
    val name = plainName(source.name ?: "bundle")
    if (source.findFile(BundleInfo.MANIFEST)?.isFile != true) {
        throw IOException("$name has no ${BundleInfo.MANIFEST}: pick a folder written by `cosmoes export`")
    }
    val partial = File(root, ".$name.partial")
    partial.deleteRecursively()
    try {
        if (!partial.mkdirs()) throw IOException("cannot create $partial")
        copyTree(context, source, partial)
        val target = File(root, name)
        target.deleteRecursively()
        if (!partial.renameTo(target)) throw IOException("cannot move the copy to $target")
        return target
    } finally {
        partial.deleteRecursively()
    }
}

private fun copyTree(context: Context, dir: DocumentFile, into: File) {
    for (child in dir.listFiles()) {
        val target = File(into, plainName(child.name ?: continue))
        if (child.isDirectory) {
            if (!target.mkdirs()) throw IOException("cannot create $target")
            copyTree(context, child, target)
        } else {
            val input = context.contentResolver.openInputStream(child.uri) ?: throw IOException("cannot read ${child.name}")
            input.use { src -> target.outputStream().use { src.copyTo(it) } }
        }
    }
}

// A document provider names files as it likes: only a plain name may become a path inside the copy.
private fun plainName(name: String): String {
    if (name.isEmpty() || name == "." || name == ".." || '/' in name || name.any { it < ' ' }) {
        throw IOException("the picked folder holds a file named '$name', which cannot be copied")
    }
    return name
}
